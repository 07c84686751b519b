"""Static scan of pickle and joblib streams against an allowlist of importable globals. Nothing is unpickled.

The scanner walks the opcodes with ``pickletools.genops`` and simulates just enough of the pickle machine to know
every global the stream would import: the strings on the stack and in the memo (so ``STACK_GLOBAL`` fed through
``BINGET``/``MEMOIZE`` tricks is resolved, and one fed by anything computed is refused), and, for joblib, the
``NumpyArrayWrapper`` state that says how many raw array bytes follow the wrapper (skipped) or that a nested pickle
follows (scanned in turn, since joblib loads it with a plain unpickler).

A global is allowed when it is on ``SAFE_CALLABLES``, or when it is a *class* defined in one of
``SAFE_CLASS_PACKAGES`` (scikit-learn, XGBoost, LightGBM, SciPy's sparse matrices, NumPy), as listed in the generated
``allowed_classes.txt``. Functions outside the explicit list are refused: ``sklearn.datasets.fetch_openml`` is
importable but must not be callable from a model file.
"""

from __future__ import annotations

import _compat_pickle
import pickletools
from dataclasses import dataclass, field
from typing import IO, Any

from registry.scanning.allowlist import allowed_classes

SAFE_CALLABLES: frozenset[tuple[str, str]] = frozenset({
    ("copyreg", "_reconstructor"),
    ("copy_reg", "_reconstructor"),
    ("_codecs", "encode"),
    ("builtins", "object"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("builtins", "complex"), ("builtins", "bytearray"), ("builtins", "dict"), ("builtins", "list"),
    ("builtins", "tuple"), ("builtins", "int"), ("builtins", "float"), ("builtins", "str"), ("builtins", "bytes"),
    ("builtins", "bool"), ("builtins", "range"),
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("collections", "Counter"),
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy.random._pickle", "__randomstate_ctor"), ("numpy.random._pickle", "__bit_generator_ctor"),
    ("numpy.random._pickle", "__generator_ctor"),
    # Not joblib.numpy_pickle_compat.NDArrayWrapper: on unpickling it has joblib read the file it names with
    # pickles allowed, so it is a gadget (the scanner never opens that file; nothing here loads a model).
    ("joblib.numpy_pickle", "NumpyArrayWrapper"),
    ("scipy.sparse._csr", "csr_matrix"), ("scipy.sparse._csc", "csc_matrix"),
})
SAFE_CLASS_PACKAGES = ("sklearn", "xgboost", "lightgbm", "scipy.sparse", "numpy")
# Model classes a pickle may rebuild (NEWOBJ, copyreg._reconstructor, then BUILD) but never construct (REDUCE, OBJ,
# INST run __init__): Booster(model_file=path) reads any file on the host as a model.
NO_CONSTRUCTOR: dict[str, str] = {
    "lightgbm.basic.Booster": "its constructor reads a model file from a path",
    "xgboost.core.Booster": "its constructor reads a model file from a path",
}
MAX_NESTING = 4


class PickleRejected(Exception):
    """``global_name`` is set when the stream names a global that is not allowed (a pickle, whatever else it is)."""

    def __init__(self, message: str, *, global_name: str | None = None) -> None:
        super().__init__(message)
        self.global_name = global_name


@dataclass
class PickleReport:
    globals_seen: set[str] = field(default_factory=set)
    arrays_skipped: int = 0
    nested_pickles: int = 0


def _python3_name(module: str, name: str, protocol: int) -> tuple[str, str]:
    """Protocol 0-2 pickles name Python 2 modules (``__builtin__``); the unpickler maps them, and so do we."""
    if protocol >= 3:
        return module, name
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _in_packages(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def check_global(module: str, name: str) -> None:
    """Raise PickleRejected unless ``module.name`` is allowed. Nothing is imported: classes are looked up in the
    generated list of model classes (``allowlist.py``), so the web process never loads scikit-learn."""
    qualified = f"{module}.{name}"
    if (module, name) in SAFE_CALLABLES:
        return
    if not _in_packages(module, SAFE_CLASS_PACKAGES):
        raise PickleRejected(f"it would import {qualified}, which is not on the allowlist of model classes",
                             global_name=qualified)
    if f"{module}:{name}" not in allowed_classes():
        raise PickleRejected(f"it would call {qualified}, which is not a model class on the portal's allowlist "
                             "(functions are never allowed)", global_name=qualified)


def _check_constructor(func: Any) -> None:
    if isinstance(func, _Global) and f"{func.module}.{func.name}" in NO_CONSTRUCTOR:
        qualified = f"{func.module}.{func.name}"
        raise PickleRejected(f"it calls the constructor of {qualified}, which model files never do "
                             f"({NO_CONSTRUCTOR[qualified]})", global_name=qualified)


class _Mark:
    pass


@dataclass
class _Global:
    module: str
    name: str


@dataclass
class _Call:
    func: Any
    args: Any
    state: Any = None


_UNKNOWN = object()
_MARK = _Mark()


# Element kinds whose bytes joblib reads as raw data: bool, integers, floats, complex, fixed-width bytes and text,
# dates and durations. Nothing in them is a pointer, so nothing in them is unpickled.
_RAW_KINDS = frozenset("biufcSUMm")


def _static_dtype(value: Any, depth: int = 0) -> Any:
    """The numpy dtype the unpickler would build from ``numpy.dtype(code, False, True)`` and its BUILD state, made
    from statically known values only, or PickleRejected when any part of it is not known with certainty.

    numpy's ``dtype.__setstate__`` decides what the dtype really is: its field list (a 'V8' can hold an object field)
    and its flags (a 'f8' whose state sets the has-object flag is an object dtype to joblib). So the dtype is rebuilt
    the same way, from plain strings, numbers and other statically rebuilt dtypes, and judged by the result."""
    import numpy as np

    if depth > 8:
        raise PickleRejected("a joblib array's element type is nested deeper than any model needs")
    if not (isinstance(value, _Call) and isinstance(value.func, _Global)
            and (value.func.module, value.func.name) == ("numpy", "dtype")
            and isinstance(value.args, tuple) and value.args and isinstance(value.args[0], str)
            and all(isinstance(a, bool) for a in value.args[1:])):
        raise PickleRejected("a joblib array's element type cannot be read statically")
    try:
        dtype: Any = np.dtype(*value.args)
    except (TypeError, ValueError):
        raise PickleRejected(f"a joblib array has an unknown element type {value.args[0]!r}") from None
    state = value.state
    if state is None:
        return dtype
    if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)
            and state[1] in ("<", ">", "|", "=") and all(isinstance(x, int) for x in state[5:8])):
        raise PickleRejected(f"a joblib array's element type {value.args[0]!r} has a state the scanner cannot read")
    subarray, names, fields = state[2], state[3], state[4]
    if subarray is not None:
        if not (isinstance(subarray, tuple) and len(subarray) == 2 and isinstance(subarray[1], tuple)
                and all(isinstance(d, int) for d in subarray[1])):
            raise PickleRejected("a joblib array's element type has a sub-array the scanner cannot read")
        subarray = (_static_dtype(subarray[0], depth + 1), subarray[1])
    if names is not None or fields is not None:
        if not (isinstance(names, tuple) and all(isinstance(n, str) for n in names) and isinstance(fields, dict)
                and set(fields) == set(names)):
            raise PickleRejected("a joblib array's structured element type has fields the scanner cannot read")
        rebuilt = {}
        for n in names:
            spec = fields[n]
            if not (isinstance(spec, tuple) and len(spec) in (2, 3) and isinstance(spec[1], int)
                    and (len(spec) == 2 or isinstance(spec[2], str | None))):
                raise PickleRejected(f"a joblib array's field {n!r} has a layout the scanner cannot read")
            rebuilt[n] = (_static_dtype(spec[0], depth + 1), *spec[1:])
        fields = rebuilt
    metadata = state[8] if len(state) == 9 else None
    if metadata is not None:
        raise PickleRejected("a joblib array's element type carries metadata, which model files do not need")
    try:
        dtype.__setstate__((state[0], state[1], subarray, names, fields, *state[5:8]))
    except (TypeError, ValueError, KeyError):
        raise PickleRejected(f"a joblib array's element type {value.args[0]!r} has an invalid state") from None
    return dtype


def _raw_safe(dtype: Any) -> bool:
    """True when every byte of an element of ``dtype`` is plain data (recursing into fields and sub-arrays)."""
    if dtype.hasobject:
        return False
    if dtype.subdtype is not None:
        return _raw_safe(dtype.subdtype[0])
    if dtype.fields is not None:
        return all(_raw_safe(spec[0]) for spec in dtype.fields.values())
    return dtype.kind in _RAW_KINDS


def _joblib_wrapper_layout(state: Any) -> tuple[bool, int] | None:
    """(has_object_dtype, byte count) of the raw data that follows a NumpyArrayWrapper, from its BUILD state.

    Raw bytes are skipped only for element types known with certainty to hold plain data; an object type (by code,
    field or flag) means joblib unpickles what follows, so it is scanned; anything else is refused."""
    if not isinstance(state, dict):
        return None
    shape = state.get("shape")
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise PickleRejected("a joblib array has a shape that is not a tuple of sizes")
    dtype = _static_dtype(state.get("dtype"))
    count = 1
    for d in shape:
        count *= d
    if dtype.hasobject:
        return True, 0
    if not _raw_safe(dtype):
        raise PickleRejected(f"a joblib array has the element type {dtype.str!r} ({dtype.kind!r} kind), whose "
                             "bytes the scanner cannot vouch for as plain numbers; save the model with plain "
                             "numeric arrays")
    return False, count * dtype.itemsize


def _is_array_wrapper(obj: Any) -> bool:
    """Whether joblib's unpickler would take ``obj`` for a NumpyArrayWrapper and read array data after its BUILD:
    made by NEWOBJ/REDUCE/OBJ/INST on the class, or by copyreg._reconstructor(NumpyArrayWrapper, ...)."""
    if not isinstance(obj, _Call) or not isinstance(obj.func, _Global):
        return False
    if obj.func.name == "NumpyArrayWrapper":
        return True
    if obj.func.name == "_reconstructor" and isinstance(obj.args, tuple) and obj.args:
        cls = obj.args[0]
        return isinstance(cls, _Global) and cls.name == "NumpyArrayWrapper"
    return False


def scan_pickle(stream: IO[bytes], *, joblib: bool = False, report: PickleReport | None = None,
                depth: int = 0, size_limit: int | None = None) -> PickleReport:
    """Scan one pickle from ``stream``'s current position up to its STOP opcode; raise PickleRejected on danger."""
    report = report or PickleReport()
    if depth > MAX_NESTING:
        raise PickleRejected("pickles are nested deeper than any model file needs")
    stack: list[Any] = []
    metastack: list[list[Any]] = []
    memo: dict[int, Any] = {}
    protocol = 0

    def pop_mark() -> list[Any]:
        nonlocal stack
        items = stack
        if not metastack:
            raise PickleRejected("the pickle's structure is corrupt (unbalanced MARK)")
        stack = metastack.pop()
        return items

    def top() -> Any:
        if not stack:
            raise PickleRejected("the pickle's structure is corrupt (empty stack)")
        return stack[-1]

    def pop() -> Any:
        if not stack:
            raise PickleRejected("the pickle's structure is corrupt (empty stack)")
        return stack.pop()

    try:
        ops = pickletools.genops(stream)
        for opcode, arg, _pos in ops:
            name = opcode.name
            if name == "PROTO":
                protocol = int(arg or 0)
                continue
            if name == "FRAME":
                continue
            if name == "STOP":
                return report
            if name == "MARK":
                metastack.append(stack)
                stack = []
            elif name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                module, attr = _python3_name(module, attr, protocol)
                check_global(module, attr)
                report.globals_seen.add(f"{module}.{attr}")
                if name == "INST":
                    _check_constructor(_Global(module, attr))
                    stack.append(_Call(_Global(module, attr), tuple(pop_mark())))
                else:
                    stack.append(_Global(module, attr))
            elif name == "STACK_GLOBAL":
                attr, module = pop(), pop()
                if not (isinstance(module, str) and isinstance(attr, str)):
                    raise PickleRejected("it builds the name of a function to import at load time "
                                         "(STACK_GLOBAL from computed values), a known scanner bypass")
                check_global(module, attr)
                report.globals_seen.add(f"{module}.{attr}")
                stack.append(_Global(module, attr))
            elif name in ("PERSID", "BINPERSID"):
                raise PickleRejected("it uses persistent ids, which hand loading over to unknown code")
            elif name in ("EXT1", "EXT2", "EXT4"):
                raise PickleRejected("it imports through the copyreg extension registry, which hides the name")
            elif name in ("REDUCE", "NEWOBJ"):
                args, func = pop(), pop()
                if name == "REDUCE":
                    _check_constructor(func)
                stack.append(_Call(func, args))
            elif name == "NEWOBJ_EX":
                _kwargs, args, func = pop(), pop(), pop()
                stack.append(_Call(func, args))
            elif name == "OBJ":
                items = pop_mark()
                if items:
                    _check_constructor(items[0])
                stack.append(_Call(items[0] if items else _UNKNOWN, tuple(items[1:])))
            elif name == "BUILD":
                state = pop()
                obj = top()
                if joblib and _is_array_wrapper(obj):
                    _check_wrapper_construction(obj)
                    obj.state = state
                    _skip_joblib_array(stream, state, report, depth, size_limit)
                elif isinstance(obj, _Call):
                    obj.state = state
                elif joblib and obj is _UNKNOWN:
                    raise PickleRejected("it sets the state of an object the scanner cannot identify, which in a "
                                         "joblib file could be an array wrapper whose data it would then misread")
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(int(arg or 0), _UNKNOWN))
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg or 0)] = top()
            elif name == "MEMOIZE":
                memo[len(memo)] = top()
            elif name == "POP":
                if stack:
                    stack.pop()
                else:
                    pop_mark()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(top())
            elif name in ("NONE",):
                stack.append(None)
            elif name in ("NEWTRUE", "NEWFALSE"):
                stack.append(name == "NEWTRUE")
            elif name in ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
                          "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                          "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"):
                stack.append(arg)
            elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"):
                stack.append({} if name == "EMPTY_DICT" else [])
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name in ("TUPLE", "LIST", "FROZENSET"):
                items = pop_mark()
                stack.append(tuple(items) if name == "TUPLE" else list(items))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items = [pop() for _ in range(n)][::-1]
                stack.append(tuple(items))
            elif name == "DICT":
                items = pop_mark()
                stack.append(_pairs_to_dict(items))
            elif name == "APPEND":
                value = pop()
                container = top()
                if isinstance(container, list):
                    container.append(value)
            elif name in ("APPENDS", "ADDITEMS"):
                items = pop_mark()
                container = top()
                if isinstance(container, list):
                    container.extend(items)
            elif name == "SETITEM":
                value, key = pop(), pop()
                container = top()
                if isinstance(container, dict) and _hashable(key):
                    container[key] = value
            elif name == "SETITEMS":
                items = pop_mark()
                container = top()
                if isinstance(container, dict):
                    container.update(_pairs_to_dict(items))
            elif name in ("NEXT_BUFFER", "READONLY_BUFFER"):
                stack.append(_UNKNOWN)
            else:
                raise PickleRejected(f"it uses the opcode {name}, which model files do not need")
    except PickleRejected:
        raise
    except (ValueError, EOFError, IndexError, UnicodeDecodeError) as exc:
        raise PickleRejected(f"the pickle is corrupt or truncated ({exc})") from None
    raise PickleRejected("the pickle ends without a STOP opcode (truncated)")


def _hashable(key: Any) -> bool:
    return isinstance(key, (str, int, float, bool, bytes, tuple, type(None)))


def _pairs_to_dict(items: list[Any]) -> dict[Any, Any]:
    result = {}
    for k, v in zip(items[::2], items[1::2], strict=False):
        if _hashable(k):
            result[k] = v
    return result


def _check_wrapper_construction(obj: _Call) -> None:
    """joblib makes its wrappers without constructor arguments and sets their state once. Constructor arguments or
    a second BUILD would give the wrapper attributes (an alignment, a dtype) that its BUILD state does not show."""
    if obj.state is not None:
        raise PickleRejected("it sets the state of a joblib array wrapper twice")
    constructed_bare = obj.args == () or (
        isinstance(obj.func, _Global) and obj.func.name == "_reconstructor" and isinstance(obj.args, tuple)
        and len(obj.args) == 3 and isinstance(obj.args[1], _Global)
        and (obj.args[1].module, obj.args[1].name) == ("builtins", "object") and obj.args[2] is None)
    if not constructed_bare:
        raise PickleRejected("it builds a joblib array wrapper with constructor arguments, which joblib never does")


def _skip_joblib_array(stream: IO[bytes], state: Any, report: PickleReport, depth: int,
                       size_limit: int | None) -> None:
    layout = _joblib_wrapper_layout(state)
    if layout is None:
        raise PickleRejected("a joblib array wrapper has no readable state")
    has_object, nbytes = layout
    if has_object:
        report.nested_pickles += 1
        scan_pickle(stream, joblib=False, report=report, depth=depth + 1, size_limit=size_limit)
        return
    if isinstance(state, dict) and state.get("numpy_array_alignment_bytes") is not None:
        pad = stream.read(1)
        if len(pad) != 1:
            raise PickleRejected("a joblib array is truncated")
        stream.seek(pad[0], 1)
    if size_limit is not None and nbytes > size_limit:
        raise PickleRejected("a joblib array claims more bytes than the whole file holds")
    start = stream.tell()
    stream.seek(nbytes, 1)
    if size_limit is not None and stream.tell() > size_limit:
        raise PickleRejected("a joblib array is truncated")
    report.arrays_skipped += 1
    del start
