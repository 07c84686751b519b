"""The classes a model pickle may name, generated from the installed libraries and committed.

The web process checks pickles against ``allowed_classes.txt`` instead of importing scikit-learn (which would cost
about 200 MB of memory per web worker). Regenerate after upgrading scikit-learn, SciPy, NumPy, XGBoost or LightGBM:

    .venv/bin/python -m registry.scanning.allowlist

A test regenerates the list and fails when it no longer matches the installed libraries.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import sys
import warnings
from pathlib import Path

LIST_FILE = Path(__file__).with_name("allowed_classes.txt")
PACKAGES = ("sklearn", "scipy.sparse", "xgboost", "lightgbm")
NUMPY_MODULES = ("numpy", "numpy.random", "numpy.dtypes", "numpy.random._mt19937", "numpy.random._pcg64",
                 "numpy.random._philox", "numpy.random._sfc64", "numpy.random._generator", "numpy.random.mtrand",
                 "numpy.random.bit_generator")
SKIP_PARTS = {"tests", "test", "testing", "conftest", "_build_utils", "externals", "__check_build", "benchmarks",
              "experimental", "dask", "spark", "plotting",
              # test helpers (sklearn.utils._testing.TempMemmap dumps data to temporary files) and mock estimators
              "_testing", "_mocking",
              # scipy.sparse.linalg's operators call the functions they hold when constructed (_init_dtype runs
              # matvec); no model pickle holds one
              "linalg"}
# Classes that open, write or map files, open sockets, or call what they are given, with why. No model pickle names
# them, and each is a gadget: numpy.memmap(path, mode="w+") plus SETITEMS writes chosen bytes to any path.
GADGETS = {
    "numpy:memmap": "opens, creates and writes the file it is given",
    "numpy:vectorize": "calls the function it wraps",
    "sklearn.utils.parallel:Parallel": "calling it runs the functions it is given",
    "sklearn.utils.parallel:_FuncWrapper": "calling it runs the function it wraps",
    "sklearn.datasets._base:RemoteFileMetadata": "names a file to download",
    "lightgbm.basic:_TempFile": "creates temporary files",
    "lightgbm.basic:Dataset": "reads a data file from a path",
    "xgboost.core:DMatrix": "reads a data file from a path or URI",
    "xgboost.core:QuantileDMatrix": "reads data through callbacks and cache files",
    "xgboost.core:ExtMemQuantileDMatrix": "writes external-memory cache files",
    "xgboost.core:DataIter": "writes cache files under a prefix it is given",
    "xgboost.core:_ProxyDMatrix": "wraps native data handles",
    "xgboost._data_utils:ArrowArray": "a ctypes structure of raw pointers",
    "xgboost._data_utils:ArrowDeviceArray": "a ctypes structure of raw pointers",
    "xgboost._data_utils:ArrowSchema": "a ctypes structure of raw pointers",
    "xgboost.tracker:RabitTracker": "opens a listening socket",
    "xgboost.federated:FederatedTracker": "starts a network server",
    "xgboost.collective:CommunicatorContext": "joins a network communicator",
    "xgboost.collective:Config": "configures a network communicator",
}


def _classes_in(module_name: str) -> set[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(module_name)
    except KeyboardInterrupt:
        raise
    except BaseException:  # optional or broken submodules (even ones raising pytest's Skipped) are not allowed
        return set()
    found = set()
    for attr, value in vars(module).items():
        if isinstance(value, type) and not attr.startswith("__"):
            owner = getattr(value, "__module__", "") or ""
            if owner == module_name or module_name.startswith("numpy"):
                found.add(f"{module_name}:{attr}")
    return found


def generate() -> list[str]:
    names: set[str] = set()
    for package in PACKAGES:
        try:
            root = importlib.import_module(package)
        except ImportError:
            continue
        names |= _classes_in(package)
        # A walk of our own: pkgutil.walk_packages imports subpackages before we can skip test helpers.
        pending = [(root.__path__, package)]
        while pending:
            paths, prefix = pending.pop()
            for info in pkgutil.iter_modules(paths, prefix=prefix + "."):
                if SKIP_PARTS & set(info.name.split(".")):
                    continue
                names |= _classes_in(info.name)
                if info.ispkg:
                    module = sys.modules.get(info.name)
                    if module is not None and hasattr(module, "__path__"):
                        pending.append((module.__path__, info.name))
    for module_name in NUMPY_MODULES:
        names |= _classes_in(module_name)
    return sorted(names - set(GADGETS))


@functools.lru_cache(maxsize=1)
def allowed_classes() -> frozenset[str]:
    return frozenset(line.strip() for line in LIST_FILE.read_text().splitlines()
                     if line.strip() and not line.startswith("#"))


if __name__ == "__main__":
    lines = generate()
    LIST_FILE.write_text("# Generated by `python -m registry.scanning.allowlist`; do not edit by hand.\n"
                         + "\n".join(lines) + "\n")
    print(f"{len(lines)} classes written to {LIST_FILE}", file=sys.stderr)
