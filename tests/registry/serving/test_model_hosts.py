"""The model sandbox and its long-lived hosts, attacked and supervised for real (bubblewrap, real processes).

Each payload is a pickle whose ``__reduce__`` runs code when loaded: the way an uploaded model file is a program.
They are loaded only through the entry points the portal uses (``sandbox.smoke_test``, ``runtime.load_serving_model``
as web and batch workers do), never here.
"""

from __future__ import annotations

import os
import pickle
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.conf import settings

from registry import sandbox, storage
from registry.models import ModelVersion
from registry.sandbox import bwrap, hosts
from registry.serving import runtime
from tests.conftest import needs_sandbox
from tests.registry import files

pytestmark = [needs_sandbox(), pytest.mark.real_sandbox]


class _Payload:
    """Pickles to ``exec(code)`` followed by building a model whose ``predict`` runs ``predict_body``."""

    def __init__(self, code: str, predict_body: str = "return [0.0] * len(X)") -> None:
        self.code = code
        self.predict_body = predict_body

    def __reduce__(self) -> tuple[Any, ...]:
        source = (self.code + "\nclass M:\n    def predict(self, X):\n        "
                  + self.predict_body.replace("\n", "\n        ") + "\nmodel = M()\n")
        # builtins.exec returns None: wrap it so the unpickled object is the model the code built.
        return (eval, (f"(lambda ns: (exec({source!r}, ns), ns['model'])[1])({{}})",))


def _pickle_file(tmp_path: Path, payload: _Payload) -> Path:
    path = tmp_path / f"{uuid.uuid4().hex}.pkl"
    path.write_bytes(pickle.dumps(payload))
    return path


def _version(path: Path) -> ModelVersion:
    blob = storage.blob_put_path(path)
    return ModelVersion(number=1, format="pickle", artifact=blob, signature={"inputs": [
        {"name": "a", "type": "double"}, {"name": "b", "type": "double"}]})


@pytest.fixture
def canary(tmp_path: Path) -> str:
    return f"canary-{uuid.uuid4().hex}"


def _no_canary_outside(token: str) -> None:
    roots = [Path(settings.VAR_DIR), Path("/tmp"), Path(settings.BASE_DIR)]
    for root in roots:
        for path in root.rglob(f"*{token}*"):
            raise AssertionError(f"the canary escaped the sandbox: {path}")


HOSTILE = """
import os, socket
results = []
def attempt(name, fn):
    try:
        results.append(f"{name}: {fn()}")
    except BaseException as exc:
        results.append(f"{name} refused: {type(exc).__name__}")
for target in (VAR + '/CANARY', BASE + '/CANARY', '/tmp/CANARY-host', SITE + '/CANARY.pth', '/CANARY',
               '/dev/CANARY'):
    attempt('write ' + target, lambda t=target: open(t, 'w').write('x'))
attempt('secret', lambda: open(VAR + '/secret_key').read())
attempt('environ', lambda: [open(f'/proc/{p}/environ', 'rb').read() for p in os.listdir('/proc') if p.isdigit()])
attempt('fork', lambda: os.fork() or 'forked')
attempt('redis', lambda: socket.create_connection(('127.0.0.1', 6379), timeout=1))
attempt('kill parent', lambda: os.kill(os.getppid(), 9))
attempt('sysctl', lambda: open('/proc/sys/kernel/printk_ratelimit', 'w').write('5'))
attempt('memfd', lambda: os.memfd_create('m'))
attempt('vsock', lambda: socket.socket(40, socket.SOCK_STREAM))
"""


def _hostile_code(canary: str) -> str:
    import site

    return (f"VAR = {str(settings.VAR_DIR)!r}\nBASE = {str(settings.BASE_DIR)!r}\n"
            f"SITE = {site.getsitepackages()[0]!r}\n" + HOSTILE.replace("CANARY", canary)
            + "\nraise RuntimeError(' | '.join(results))\n")


def test_a_one_shot_load_sees_nothing_and_keeps_nothing(tmp_path: Path, canary: str) -> None:
    path = _pickle_file(tmp_path, _Payload(_hostile_code(canary)))
    result = sandbox.smoke_test("pickle", path, {})
    assert not result.ok
    report = result.error.removeprefix("RuntimeError: ")
    outcome = dict(part.split(": ", 1) if ": " in part else (part, "") for part in report.split(" | "))
    refused = [f"{settings.VAR_DIR}/{canary}", f"/{canary}", f"/dev/{canary}"]
    if not str(settings.BASE_DIR).startswith("/tmp/"):
        # A checkout under /tmp (CI's) has its path inside the sandbox's private /tmp, where a write lands in the
        # sandbox's own tmpfs; _no_canary_outside below shows it never reaches the real folder.
        refused.append(f"{settings.BASE_DIR}/{canary}")
    for target in refused:
        assert f"write {target} refused" in outcome, report
    assert any(k.startswith("write ") and k.endswith(".pth refused") for k in outcome), report
    assert outcome.get(f"write /tmp/{canary}-host") == "1"  # its private /tmp, gone with it
    assert "secret refused" in report and "fork refused" in report and "redis refused" in report, report
    assert "sysctl refused" in report and "memfd refused" in report and "vsock refused" in report, report
    assert settings.SECRET_KEY not in report and str(settings.DATABASES["default"]["NAME"]) not in report
    _no_canary_outside(canary)
    assert os.getpid() > 0  # this process is alive: the payload's kill reached only the sandbox's own pid 1


def test_what_a_sandbox_can_read_of_its_own_environment_is_the_allowlist(tmp_path: Path) -> None:
    path = _pickle_file(tmp_path, _Payload(
        "import os\nraise RuntimeError(repr(sorted(open('/proc/1/environ','rb').read().split(b'\\0')) + "
        "sorted(os.environ)))"))
    result = sandbox.smoke_test("pickle", path, {})
    # PWD: bubblewrap sets it to the --chdir folder (/tmp) as it execs the program, which is now the sandbox's pid 1.
    allowed = set(bwrap.FIXED_ENV) | set(bwrap.PASSED_THROUGH) | {"PWD"}
    names = {part.split("=")[0].strip(" b'\"") for part in result.error.replace("[", ",").split(",") if "=" in part}
    assert names and names <= allowed, names - allowed
    assert f"PWD={bwrap.INSIDE_TMP}" in result.error
    for name, value in os.environ.items():
        if name not in allowed and len(value) >= 8:
            assert value not in result.error, name


def test_a_fork_bomb_stops_at_its_first_fork(tmp_path: Path) -> None:
    path = _pickle_file(tmp_path, _Payload(
        "import os\nn = 0\nfor _ in range(2000):\n    try:\n        os.fork()\n        n += 1\n"
        "    except OSError:\n        break\nraise RuntimeError(f'forked {n} times')"))
    result = sandbox.smoke_test("pickle", path, {})
    assert "forked 0 times" in result.error, result.error


def test_a_memory_bomb_meets_the_address_space_limit(tmp_path: Path) -> None:
    path = _pickle_file(tmp_path, _Payload("chunks = [bytearray(1 << 30) for _ in range(20)]"))
    started = time.monotonic()
    result = sandbox.smoke_test("pickle", path, {})
    assert not result.ok and "memory" in result.error.lower(), result.error
    assert time.monotonic() - started < 60


@pytest.mark.django_db
def test_a_host_serves_from_its_own_process_and_survives_the_callers_retries(tmp_path: Path) -> None:
    path = _pickle_file(tmp_path, _Payload(
        "import os", "import numpy as np\nreturn (X['a'] * 2 + X['b']).to_numpy() + (os.getpid() - os.getpid())"))
    loaded = runtime.load_serving_model(version=_version(path), kind="native", blob=None, key="t-serve")
    try:
        matrix = np.array([[1.0, 2.0], [3.0, 4.0]])
        assert loaded.predict(matrix) == [4.0, 10.0]
        host = hosts.pool._hosts["t-serve"]
        assert host.running and host.starts == 1
        assert loaded.predict(matrix[:1]) == [4.0]
        assert host.starts == 1  # one long-lived process, not one per request
    finally:
        loaded.close()
    assert not host.running


@pytest.mark.django_db
def test_a_crashed_host_answers_503_then_comes_back(tmp_path: Path) -> None:
    path = _pickle_file(tmp_path, _Payload("import os", "return [float(os.getpid() > 0)] * len(X)"))
    loaded = runtime.load_serving_model(version=_version(path), kind="native", blob=None, key="t-crash")
    try:
        matrix = np.array([[1.0, 2.0]])
        assert loaded.predict(matrix) == [1.0]
        host = hosts.pool._hosts["t-crash"]
        assert host._proc is not None
        os.killpg(host._proc.pid, signal.SIGKILL)
        host._proc.wait()
        with pytest.raises(hosts.HostUnavailable, match=r"killed by signal|closed"):
            loaded.predict(matrix)
        with pytest.raises(hosts.HostUnavailable, match="restarting"):
            loaded.predict(matrix)  # within the backoff: refused at once, no restart storm
        host._retry_at = 0.0  # the backoff (1 s) has passed
        assert loaded.predict(matrix) == [1.0]
        assert host.starts == 2
    finally:
        loaded.close()


@pytest.mark.django_db
def test_a_hung_host_is_killed_at_its_timeout_and_others_keep_serving(tmp_path: Path, settings: Any) -> None:
    settings.PORTAL_MODEL_HOST_TIMEOUT_SECONDS = 1
    hung = _pickle_file(tmp_path, _Payload("import time", "time.sleep(30)\nreturn [0.0] * len(X)"))
    fine = _pickle_file(tmp_path, _Payload("", "return [7.0] * len(X)"))
    slow = runtime.load_serving_model(version=_version(hung), kind="native", blob=None, key="t-hung")
    good = runtime.load_serving_model(version=_version(fine), kind="native", blob=None, key="t-fine")
    try:
        matrix = np.array([[1.0, 2.0]])
        assert good.predict(matrix) == [7.0]
        started = time.monotonic()
        with pytest.raises(hosts.HostUnavailable, match="did not answer"):
            slow.predict(matrix)
        assert time.monotonic() - started < 10
        assert good.predict(matrix) == [7.0]
    finally:
        slow.close()
        good.close()


@pytest.mark.django_db
def test_a_model_error_is_bounded_text_and_the_host_stays(tmp_path: Path) -> None:
    path = _pickle_file(tmp_path, _Payload("", "raise ValueError('x' * 100000)"))
    loaded = runtime.load_serving_model(version=_version(path), kind="native", blob=None, key="t-error")
    try:
        with pytest.raises(hosts.HostModelError) as caught:
            loaded.predict(np.array([[1.0, 2.0]]))
        assert len(str(caught.value)) <= hosts.MAX_ERROR_CHARS
        host = hosts.pool._hosts["t-error"]
        assert host.running and host.starts == 1
    finally:
        loaded.close()


@pytest.mark.django_db
def test_hosts_are_bounded_per_process_and_reaped_when_idle(tmp_path: Path, settings: Any) -> None:
    settings.PORTAL_MODEL_HOSTS_PER_PROCESS = 1
    first = _pickle_file(tmp_path, _Payload("", "return [1.0] * len(X)"))
    second = _pickle_file(tmp_path, _Payload("", "return [2.0] * len(X)"))
    one = runtime.load_serving_model(version=_version(first), kind="native", blob=None, key="t-one")
    two = runtime.load_serving_model(version=_version(second), kind="native", blob=None, key="t-two")
    try:
        matrix = np.array([[1.0, 2.0]])
        assert one.predict(matrix) == [1.0]
        host_one = hosts.pool._hosts["t-one"]
        assert two.predict(matrix) == [2.0]
        assert not host_one.running  # the least recently used host made room
        assert one.predict(matrix) == [1.0]  # and starts again when asked
        host_two = hosts.pool._hosts["t-two"]
        host_one.last_used -= 3600
        assert hosts.pool.reap(idle_seconds=60) == 1
        assert not host_one.running and not host_two.running
    finally:
        one.close()
        two.close()


def test_the_seccomp_program_is_well_formed() -> None:
    program = bwrap.seccomp_program()
    assert program is not None and len(program) % 8 == 0


@pytest.mark.django_db
def test_an_mlflow_model_is_answered_by_mlflows_own_scoring_code_in_its_host(tmp_path: Path) -> None:
    import orjson

    archive, pipe, X = files.docs_idiom_pipeline(tmp_path)
    version = ModelVersion(number=1, format="mlflow", artifact=storage.blob_put_path(archive), signature={})
    host = hosts.pool.get("t-mlflow", runtime.materialiser(version), label="t")
    try:
        rows = X.head(4)
        body = orjson.dumps({"dataframe_split": {"columns": list(rows.columns), "data": rows.to_numpy().tolist()}})
        answer = host.invoke(body, "application/json", timeout=30)
        assert answer.status == 200, answer.body
        assert orjson.loads(answer.body)["predictions"] == pipe.predict(rows).tolist()
        assert answer.columns == ["plan", "age", "spend"] and answer.count == 4
        assert answer.rows is not None and answer.rows[0][0] == rows.iloc[0]["plan"]
        missing = host.invoke(orjson.dumps({"dataframe_split": {"columns": ["plan"], "data": [["gold"]]}}),
                              "application/json", timeout=30)
        assert missing.status == 400, missing.body
        assert orjson.loads(missing.body)["error_code"] == "INVALID_PARAMETER_VALUE" and "age" in missing.body
        unsupported = host.invoke(b"x", "application/xml", timeout=30)
        assert unsupported.status == 415
        assert host.starts == 1
    finally:
        hosts.pool.release("t-mlflow")


@pytest.mark.django_db
def test_the_matrix_path_answers_as_the_estimator_does_on_a_frame(tmp_path: Path) -> None:
    """The host feeds a bare array only where that gives the DataFrame's answers: not to a ColumnTransformer that
    picks columns by name, nor when the request's column order is not the one the estimator was fitted with."""
    import joblib
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LinearRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(3)
    X = pd.DataFrame({"a": rng.random(50), "b": rng.random(50) * 10})
    y = X["a"] * 3 - X["b"]
    plain = LinearRegression().fit(X, y)
    by_name = Pipeline([("pick", ColumnTransformer([("s", StandardScaler(), ["b"])])),
                        ("lr", LinearRegression())]).fit(X, y)
    rows = X.head(3)
    for i, estimator in enumerate((plain, by_name)):
        path = tmp_path / f"m{i}.joblib"
        joblib.dump(estimator, path)
        version = _version(path)
        version.format = "joblib"
        loaded = runtime.load_serving_model(version=version, kind="native", blob=None, key=f"t-matrix-{i}")
        try:
            for _ in range(3):  # the first call decides, the next ones use the decision
                assert loaded.predict(rows.to_numpy()) == estimator.predict(rows).tolist()
        finally:
            loaded.close()


@pytest.mark.django_db
def test_a_host_started_by_a_short_lived_thread_outlives_it(tmp_path: Path) -> None:
    """Threaded servers answer each request on a thread of its own; a host one of them started must survive it."""
    import threading

    path = _pickle_file(tmp_path, _Payload("", "return [5.0] * len(X)"))
    loaded = runtime.load_serving_model(version=_version(path), kind="native", blob=None, key="t-thread")
    try:
        matrix = np.array([[1.0, 2.0]])
        answers: list[Any] = []
        request_thread = threading.Thread(target=lambda: answers.append(loaded.predict(matrix)))
        request_thread.start()
        request_thread.join()
        time.sleep(0.5)  # a parent-death signal, if any, has arrived by now
        assert answers == [[5.0]] and loaded.predict(matrix) == [5.0]
        assert hosts.pool._hosts["t-thread"].starts == 1
    finally:
        loaded.close()


@pytest.mark.django_db
def test_a_host_that_doles_out_its_answer_byte_by_byte_meets_one_deadline(tmp_path: Path, settings: Any) -> None:
    settings.PORTAL_MODEL_HOST_TIMEOUT_SECONDS = 2
    drip = ("import os, stat, time\n"
            "sock = next(fd for fd in range(3, 64) if os.path.exists(f'/proc/self/fd/{fd}') "
            "and stat.S_ISSOCK(os.fstat(fd).st_mode))\n"
            "os.write(sock, b'\\x00\\x00\\x00\\x28')\n"
            "for _ in range(15):\n    os.write(sock, b' ')\n    time.sleep(1)\nreturn [0.0] * len(X)")
    path = _pickle_file(tmp_path, _Payload("", drip))
    loaded = runtime.load_serving_model(version=_version(path), kind="native", blob=None, key="t-drip")
    try:
        started = time.monotonic()
        with pytest.raises(hosts.HostUnavailable, match="did not answer"):
            loaded.predict(np.array([[1.0, 2.0]]))
        assert time.monotonic() - started < 2 + 0.001 * 1 + 3  # its timeout, not 15 s of drip
    finally:
        loaded.close()
