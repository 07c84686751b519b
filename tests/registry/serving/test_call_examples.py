"""The call examples of the environment page: what a shell and Python make of them is exactly the body shown."""

from __future__ import annotations

import ast
import json
import subprocess
from typing import Any

import pytest

from registry.models import ModelVersion
from registry.serving.call_examples import call_example

URL = "http://portal.example/api/v1/serve/it's/dev/invocations"


def _shell_payload(curl: str) -> Any:
    """What bash passes to curl's --data: printf gets the same word, quoted as the page quotes it."""
    quoted = curl.split("  --data ", 1)[1]
    done = subprocess.run(["bash", "-c", f"printf '%s' {quoted}"], capture_output=True, text=True, timeout=30,
                          check=True)
    return json.loads(done.stdout)


def _python_body(snippet: str) -> Any:
    tree = ast.parse(snippet)
    keywords = {k.arg: k.value for node in ast.walk(tree) if isinstance(node, ast.Call) for k in node.keywords}
    return ast.literal_eval(keywords["json"])


@pytest.mark.parametrize("example,signature,sensitive,expected", [
    pytest.param({"columns": ["note", "n", "x", "flag", "gone"],
                  "data": [["it's \"quoted\"\n$HOME `id` \\", 1, 2.5, True, None], ["b", 2, float("nan"), False, None],
                           ["c", 3, 1.0, True, None], ["d", 4, 1.0, True, None]]}, {}, {},
                 {"dataframe_split": {"columns": ["note", "n", "x", "flag", "gone"],
                                      "data": [["it's \"quoted\"\n$HOME `id` \\", 1, 2.5, True, None],
                                               ["b", 2, None, False, None], ["c", 3, 1.0, True, None]]}},
                 id="shell-hostile text, NaN as null, three rows at most"),
    pytest.param([{"email": "jane@example.org", "age": 40}], {"inputs": [{"name": "email", "type": "string"},
                                                                          {"name": "age", "type": "long"}]},
                 {"email": "personal"},
                 {"dataframe_split": {"columns": ["email", "age"], "data": [["text", 40]]}},
                 id="records example, sensitive value replaced"),
    pytest.param(None, {"inputs": [{"name": "when", "type": "datetime"}, {"name": "tags", "type": "array",
                                                                         "items": {"type": "string"}}]}, {},
                 {"dataframe_split": {"columns": ["when", "tags"], "data": [["2024-01-01T00:00:00", ["text"]]]}},
                 id="no example: placeholders typed by the signature"),
    pytest.param(None, {"inputs": [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 3]}}]}, {},
                 {"inputs": [[0.0, 0.0, 0.0]]}, id="tensor signature"),
])
def test_the_shell_and_python_send_exactly_the_body_shown(example: Any, signature: dict[str, Any],
                                                          sensitive: dict[str, str], expected: dict[str, Any]) -> None:
    version = ModelVersion(input_example=example, signature=signature, sensitive_columns=sensitive)
    call = call_example(version=version, url=URL)
    assert call.body == expected
    assert _shell_payload(call.curl) == expected
    assert _python_body(call.python) == expected
    assert '-H "Authorization: Bearer $PORTAL_TOKEN"' in call.curl
    assert "os.environ['PORTAL_TOKEN']" in call.python and json.dumps(URL) in call.python


def test_a_version_whose_inputs_are_unknown_gets_an_empty_table_to_fill_in() -> None:
    call = call_example(version=ModelVersion(input_example=None, signature={}), url=URL)
    assert call.source == "none" and call.body == {"dataframe_split": {"columns": [], "data": []}}
    assert _shell_payload(call.curl) == call.body
