"""How to call a deployed model: a request body built from the serving version's input example or signature, shown
as the URL, a curl command and a Python snippet on the environment page.

Invariants: the examples never hold a secret (the token is read from ``$PORTAL_TOKEN``); the curl command is one a
POSIX shell runs as shown (every argument quoted with ``shlex.quote``) and the Python snippet is valid Python
(values written as Python literals, never pasted JSON); values of columns marked sensitive are replaced by typed
placeholders, so an example row holding personal data is not repeated to every reader of the page.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass
from typing import Any

from registry.models import EnvironmentState, ModelVersion, RegisteredModel

MAX_EXAMPLE_ROWS = 3
MAX_EXAMPLE_COLUMNS = 200
TOKEN_VARIABLE = "PORTAL_TOKEN"  # noqa: S105 (the name of a variable, not a secret)

# What MLflow's column types take in a JSON body (its scoring server parses datetimes from ISO strings and binary
# from base64).
_PLACEHOLDERS: dict[str, Any] = {
    "string": "text", "integer": 0, "long": 0, "float": 0.0, "double": 0.0, "boolean": False,
    "datetime": "2024-01-01T00:00:00", "binary": "",
}


@dataclass(frozen=True)
class CallExample:
    url: str
    body: dict[str, Any]
    source: str  # "example" (the version's input example), "signature" (placeholders) or "none"
    curl: str
    python: str
    placeholder_columns: tuple[str, ...] = ()


def _placeholder(spec: dict[str, Any]) -> Any:
    kind = str(spec.get("type") or "")
    if kind == "tensor":
        dtype = str((spec.get("tensor-spec") or {}).get("dtype") or "")
        return "text" if dtype.startswith(("str", "object")) else 0 if dtype.startswith(("int", "uint")) else 0.0
    if kind == "array":
        return [_placeholder(spec.get("items") or {})]
    return _PLACEHOLDERS.get(kind, 0.0)


def _input_specs(version: ModelVersion) -> list[dict[str, Any]]:
    inputs = (version.signature or {}).get("inputs") or []
    return [c for c in inputs if isinstance(c, dict)][:MAX_EXAMPLE_COLUMNS] if isinstance(inputs, list) else []


def _split_from_example(example: Any, names: list[str], limit: int) -> dict[str, Any] | None:
    """The stored input example as ``{"columns", "data"}`` rows, or None when it is not a table."""
    if isinstance(example, dict) and isinstance(example.get("data"), list):
        columns = example.get("columns") or names
        data = example["data"]
    elif isinstance(example, list) and example and all(isinstance(r, dict) for r in example):
        columns = list(example[0])
        data = [[r.get(c) for c in columns] for r in example]
    elif isinstance(example, list) and example and all(isinstance(r, list) for r in example) and names:
        columns, data = names, example
    else:
        return None
    if not isinstance(columns, list) or not columns or not all(isinstance(r, list) and len(r) == len(columns)
                                                                for r in data) or not data:
        return None
    return {"columns": [str(c) for c in columns], "data": [list(r) for r in data[:limit]]}


@dataclass(frozen=True)
class ExampleRows:
    """A version's example as a request carries it: the column names (none for a tensor signature) and the rows,
    with where they came from: ``example`` (the version's input example), ``signature`` (typed placeholders) or
    ``none``. The environment page shows it; a deployment validates the serving form with it."""

    columns: list[str]
    rows: list[list[Any]]
    source: str

    @property
    def body(self) -> dict[str, Any]:
        """The MLflow request body: ``dataframe_split`` for columns, ``inputs`` rows for a tensor."""
        if self.columns or self.source == "none":
            return {"dataframe_split": {"columns": list(self.columns), "data": [list(r) for r in self.rows]}}
        return {"inputs": [list(r) for r in self.rows]}


def _tensor_rows(example: Any) -> list[list[Any]] | None:
    rows = example.get("data") if isinstance(example, dict) else example
    if isinstance(rows, list) and rows and all(isinstance(r, list) for r in rows) and len({len(r) for r in rows}) == 1:
        return rows
    return None


def example_rows(version: ModelVersion, *, limit: int = MAX_EXAMPLE_ROWS) -> ExampleRows:
    """The version's input example as rows a request carries (in the signature's column order where it names
    columns, extra example columns left out as MLflow ignores them), else placeholders typed by the signature."""
    specs = _input_specs(version)
    # A bare ONNX graph's input (``shape`` from its inspection) is a tensor, as an MLflow tensor spec is.
    named = [c for c in specs if c.get("name") is not None and c.get("type") != "tensor" and "shape" not in c]
    names = [str(c["name"]) for c in named]
    tensors = [c for c in specs if c.get("type") == "tensor" or "shape" in c]
    example = version.input_example
    if (version.signature or {}).get("positional"):
        # Names the portal made up for a model that takes its inputs by position: rows without names, as MLflow
        # passes them.
        split = _split_from_example(example, names, limit)
        if split is not None:
            return ExampleRows([], split["data"], "example")
    if tensors and not names:
        rows = _tensor_rows(example)
        if rows is not None:
            return ExampleRows([], [list(r) for r in rows[:limit]], "example")
    else:
        split = _split_from_example(example, names, limit)
        if split is not None and (not names or set(names) <= set(split["columns"])):
            columns = split["columns"]
            if names and names != columns:
                index = [columns.index(c) for c in names]
                return ExampleRows(names, [[row[i] for i in index] for row in split["data"]], "example")
            return ExampleRows(columns, split["data"], "example")
    if named:
        return ExampleRows(names, [[_placeholder(c) for c in named]], "signature")
    if tensors:
        shape = tensors[0].get("shape") or (tensors[0].get("tensor-spec") or {}).get("shape") or []
        width = shape[1] if len(shape) > 1 and isinstance(shape[1], int) and shape[1] > 0 else 1
        return ExampleRows([], [[_placeholder(tensors[0])] * min(width, MAX_EXAMPLE_COLUMNS)], "signature")
    return ExampleRows([], [], "none")


def example_body(version: ModelVersion) -> tuple[dict[str, Any], str, tuple[str, ...]]:
    """The body to show: (body, where it came from, columns whose example values were replaced)."""
    specs = _input_specs(version)
    tensors = [c for c in specs if c.get("type") == "tensor"]
    if len(tensors) > 1 and all(t.get("name") for t in tensors) and len(tensors) == len(specs):
        return {"inputs": {str(t["name"]): [[_placeholder(t)]] for t in tensors}}, "signature", ()
    example = example_rows(version)
    if example.source != "example" or not example.columns:
        return example.body, example.source, tuple(example.columns) if example.source == "signature" else ()
    sensitive = set(version.sensitive_columns or {})
    by_name = {str(c["name"]): c for c in specs if c.get("name") is not None}
    hidden = tuple(c for c in example.columns if c in sensitive)
    rows = [[_placeholder(by_name.get(column, {"type": "string"})) if column in sensitive else value
             for column, value in zip(example.columns, row, strict=True)] for row in example.rows]
    return ExampleRows(example.columns, rows, "example").body, "example", hidden


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: an example's missing value is sent as null, as pandas writes it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _json_literal(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def _python_literal(value: Any) -> str:
    """``value`` as Python source. JSON's string escapes are all Python escapes, so strings are written as JSON
    writes them (double quotes, like the curl body); true, false and null are not Python."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _json_literal(value)
    if isinstance(value, list):
        return "[" + ", ".join(_python_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_json_literal(str(k))}: {_python_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"not JSON data: {type(value).__name__}")


def _layout(body: dict[str, Any], literal: Any, *, indent: str, step: str, trailing: str) -> str:
    """A body written one example row per line, so a person can see and edit the rows; other bodies on one line."""
    split = body.get("dataframe_split") if list(body) == ["dataframe_split"] else None
    if not isinstance(split, dict) or list(split) != ["columns", "data"] or not split["data"]:
        return str(literal(body))
    inner = indent + step
    rows = ",\n".join(f"{inner}{step}{literal(row)}" for row in split["data"])
    return (f'{{"dataframe_split": {{\n{inner}"columns": {literal(split["columns"])},\n{inner}"data": [\n'
            f"{rows}{trailing}\n{inner}]}}}}")


def _curl(url: str, body: dict[str, Any]) -> str:
    payload = _layout(body, _json_literal, indent="  ", step="  ", trailing="")
    return " \\\n".join([
        f"curl -sS -X POST {shlex.quote(url)}",
        f'  -H "Authorization: Bearer ${TOKEN_VARIABLE}"',
        "  -H 'Content-Type: application/json'",
        f"  --data {shlex.quote(payload)}",
    ])


def _python(url: str, body: dict[str, Any]) -> str:
    return "\n".join([
        "import os",
        "",
        "import requests",
        "",
        "response = requests.post(",
        f"    {_json_literal(url)},",
        f'    headers={{"Authorization": f"Bearer {{os.environ[{TOKEN_VARIABLE!r}]}}"}},',
        f"    json={_layout(body, _python_literal, indent='    ', step='    ', trailing=',')},",
        "    timeout=30,",
        ")",
        "response.raise_for_status()",
        'print(response.json()["predictions"])',
    ])


def call_example(*, version: ModelVersion, url: str) -> CallExample:
    """The ways to call ``url`` (the absolute scoring URL of an environment) with a body ``version`` accepts."""
    body, source, placeholders = example_body(version)
    body = _finite(body)
    return CallExample(url=url, body=body, source=source, curl=_curl(url, body), python=_python(url, body),
                       placeholder_columns=placeholders)


def serving_version(*, model: RegisteredModel, environment: str) -> ModelVersion | None:
    """The version answering most of ``environment``'s traffic (the champion), whose inputs the example follows."""
    state = (EnvironmentState.objects.filter(model=model, environment=environment)
             .select_related("champion__version").first())
    return state.champion.version if state is not None and state.champion is not None else None
