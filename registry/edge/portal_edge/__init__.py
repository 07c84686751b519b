"""portal_edge: run a portal edge package on a device, offline, with onnxruntime and numpy only.

    python -m portal_edge rows.json            # or rows.csv, or - for standard input; predictions on stdout
    python -m portal_edge verify [--public-key portal-edge-key.pem]
    python -m portal_edge upload --url https://portal.example.com --token mle_…

Nothing of the portal is imported: this package travels inside every edge package beside the model files and the
signed manifest. Every prediction is kept on the device (``outbox/``, one JSON-lines file per run) with an id made
here; ``upload`` sends what is kept whenever the portal can be reached, and the portal keeps each id once, so a
file sent twice (the answer to the first send was lost) is logged once.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.sig"
PUBLIC_KEY = "public_key.pem"
OUTBOX = "outbox"
SENT = "sent"
UPLOAD_PATH = "/api/v1/edge/uploads"
UPLOAD_CHUNK = 500


class PackageError(Exception):
    """The package is not what its signed manifest says, or the input cannot be scored."""


# --- Ed25519 verification (RFC 8032, section 5.1.7), in plain Python: the device needs no crypto library ----------

_P = 2 ** 255 - 19
_L = 2 ** 252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _recover_x(y: int, sign: int) -> int | None:
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P:
        return None
    if (x & 1) != sign:
        x = _P - x
    return x


def _add(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    p1 = (a[1] - a[0]) * (b[1] - b[0]) % _P
    p2 = (a[1] + a[0]) * (b[1] + b[0]) % _P
    c = 2 * a[3] * b[3] * _D % _P
    d = 2 * a[2] * b[2] % _P
    e, f, g, h = p2 - p1, d - c, d + c, p2 + p1
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _mul(s: int, point: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    q = (0, 1, 1, 0)
    while s > 0:
        if s & 1:
            q = _add(q, point)
        point = _add(point, point)
        s >>= 1
    return q


def _equal(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return (a[0] * b[2] - b[0] * a[2]) % _P == 0 and (a[1] * b[2] - b[1] * a[2]) % _P == 0


def _decompress(data: bytes) -> tuple[int, int, int, int] | None:
    if len(data) != 32:
        return None
    y = int.from_bytes(data, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    x = _recover_x(y, sign)
    return None if x is None else (x, y, 1, x * y % _P)


_GY = 4 * pow(5, _P - 2, _P) % _P
_GX = _recover_x(_GY, 0)
assert _GX is not None
_G = (_GX, _GY, 1, _GX * _GY % _P)


def ed25519_verify(public: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public``'s Ed25519 signature of ``message``."""
    if len(public) != 32 or len(signature) != 64:
        return False
    a = _decompress(public)
    r = _decompress(signature[:32])
    if a is None or r is None:
        return False
    s = int.from_bytes(signature[32:], "little")
    if s >= _L:
        return False
    h = int.from_bytes(hashlib.sha512(signature[:32] + public + message).digest(), "little") % _L
    return _equal(_mul(s, _G), _add(r, _mul(h, a)))


_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")  # SubjectPublicKeyInfo of an Ed25519 key, before its 32 bytes


def public_key_bytes(pem: str) -> bytes:
    """The raw 32 bytes of an Ed25519 public key in PEM (SubjectPublicKeyInfo)."""
    lines = [line.strip() for line in pem.strip().splitlines()]
    if not lines or lines[0] != "-----BEGIN PUBLIC KEY-----" or lines[-1] != "-----END PUBLIC KEY-----":
        raise PackageError("the public key is not a PEM public key")
    der = base64.b64decode("".join(lines[1:-1]))
    if len(der) != 44 or not der.startswith(_SPKI_PREFIX):
        raise PackageError("the public key is not an Ed25519 key")
    return der[len(_SPKI_PREFIX):]


def fingerprint(public: bytes) -> str:
    return hashlib.sha256(public).hexdigest()


# --- The package -------------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(root: Path, *, trusted_key: str | None = None) -> tuple[list[str], dict[str, Any]]:
    """(problems, manifest): the manifest's signature checked against ``trusted_key`` (PEM; else the key in the
    package, whose fingerprint the manifest must name), then every file's SHA-256 against the manifest, and no file
    in the package that the manifest does not name (``outbox/`` and ``sent/`` excepted: the runner's own)."""
    problems: list[str] = []
    try:
        raw = (root / MANIFEST).read_bytes()
        signature = base64.b64decode((root / SIGNATURE).read_bytes().strip(), validate=True)
    except (OSError, ValueError) as exc:
        return [f"the manifest or its signature cannot be read ({exc})"], {}
    try:
        public = public_key_bytes(trusted_key if trusted_key is not None else (root / PUBLIC_KEY).read_text())
    except (OSError, ValueError, PackageError) as exc:
        return [f"the public key cannot be read ({exc})"], {}
    if not ed25519_verify(public, raw, signature):
        return ["the manifest's signature does not verify with " + (
            "the key given" if trusted_key is not None else "the package's public key")], {}
    manifest = json.loads(raw)
    if manifest.get("key_fingerprint") != fingerprint(public):
        problems.append("the manifest names another signing key (fingerprint "
                        f"{str(manifest.get('key_fingerprint'))[:16]}…, the key here is {fingerprint(public)[:16]}…)")
    files = manifest.get("files") or {}
    for name, expected in sorted(files.items()):
        path = root / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif _sha256(path) != expected:
            problems.append(f"{name}: its SHA-256 is not the one the manifest signed")
    named = set(files) | {MANIFEST, SIGNATURE}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in named and rel.split("/")[0] not in (OUTBOX, SENT) \
                and "__pycache__" not in rel.split("/"):
            problems.append(f"{rel}: not in the manifest")
    return problems, manifest


def _cell(value: Any, allow_missing: bool) -> float:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        if not allow_missing:
            raise PackageError("a value is missing, and this model was not proven on missing values")
        return math.nan
    if isinstance(value, bool):
        return float(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PackageError(f"{value!r} is not a number") from None
    if math.isnan(number) and not allow_missing:
        raise PackageError("a value is missing, and this model was not proven on missing values")
    return number


def _rows_from(data: Any, columns: list[str]) -> list[list[Any]]:
    """Rows in the model's column order from the MLflow request forms (``dataframe_split``, ``dataframe_records``,
    ``instances``, ``inputs``) or a bare list of rows or records."""
    if isinstance(data, dict):
        if "dataframe_split" in data:
            split = data["dataframe_split"]
            names = split.get("columns") or columns
            return [[dict(zip(names, row, strict=False)).get(c) for c in columns] for row in split.get("data", [])]
        for key in ("dataframe_records", "instances", "inputs"):
            if key in data:
                return _rows_from(data[key], columns)
        raise PackageError("a JSON object must hold dataframe_split, dataframe_records, instances or inputs")
    if not isinstance(data, list):
        raise PackageError("the input must be rows: a JSON list, or an MLflow request")
    rows = []
    for item in data:
        if isinstance(item, dict):
            absent = [c for c in columns if c not in item]
            if absent:
                raise PackageError(f"a row lacks {', '.join(absent[:5])}")
            rows.append([item[c] for c in columns])
        elif isinstance(item, list):
            if columns and len(item) != len(columns):
                raise PackageError(f"a row has {len(item)} values; the model takes {len(columns)}")
            rows.append(item)
        else:
            raise PackageError("each row must be a list of values or an object of named values")
    return rows


def read_input(text: str, columns: list[str], *, csv_input: bool) -> list[list[Any]]:
    if csv_input:
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header is None:
            return []
        header = [h.strip() for h in header]
        absent = [c for c in columns if c not in header]
        if absent:
            raise PackageError(f"the CSV header lacks {', '.join(absent[:5])}")
        index = [header.index(c) for c in columns]
        return [[row[i] for i in index] for row in reader if row]
    return _rows_from(json.loads(text), columns)


class Runner:
    """One form of a verified package, loaded with onnxruntime (one thread, as the portal serves it)."""

    def __init__(self, root: Path, *, form: str | None = None, trusted_key: str | None = None) -> None:
        problems, manifest = verify(root, trusted_key=trusted_key)
        if problems:
            raise PackageError("the package does not verify: " + "; ".join(problems))
        self.root, self.manifest = root, manifest
        forms = {f["name"]: f for f in manifest["forms"]}
        name = form or manifest["default_form"]
        if name not in forms:
            raise PackageError(f"this package has no {name} form (it has {', '.join(sorted(forms))})")
        self.form = forms[name]
        self.columns: list[str] = list(manifest["columns"])
        self.allow_missing = bool(manifest.get("missing_values"))
        import numpy as np
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(root / self.form["file"]), sess_options=options,
                                                    providers=["CPUExecutionProvider"])
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.dtype = np.float32 if first.type == "tensor(float)" else np.float64
        self.output_name = self.session.get_outputs()[0].name

    def predict(self, rows: list[list[Any]]) -> list[Any]:
        import numpy as np

        try:  # numbers (or numeric text, null as missing) in one step; anything else cell by cell, saying which
            matrix = np.asarray(rows, dtype=np.float64)
        except (TypeError, ValueError):
            matrix = np.asarray([[_cell(v, self.allow_missing) for v in row] for row in rows], dtype=np.float64)
        if not self.allow_missing and matrix.size and np.isnan(matrix).any():
            raise PackageError("a value is missing, and this model was not proven on missing values")
        if matrix.ndim != 2 or (self.columns and matrix.shape[1] != len(self.columns)):
            raise PackageError(f"the model takes rows of {len(self.columns)} values")
        if not len(matrix):
            return []
        result = np.asarray(self.session.run([self.output_name], {self.input_name: matrix.astype(self.dtype)})[0])
        return list(np.asarray(result).ravel().tolist())


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def store(outbox: Path, manifest: dict[str, Any], form: str, rows: list[list[Any]], predictions: list[Any],
          elapsed: float) -> list[str]:
    """Keep one run's predictions on the device: one JSON-lines file, written whole then renamed into ``outbox``."""
    outbox.mkdir(parents=True, exist_ok=True)
    ids = [uuid.uuid4().hex for _ in predictions]
    now = time.time()
    per_row = 1000 * elapsed / max(1, len(predictions))
    name = f"{int(now * 1000):015d}-{ids[0] if ids else uuid.uuid4().hex}.jsonl"
    partial = outbox / f".{name}.partial"
    with open(partial, "w", encoding="utf-8") as fh:
        for pid, row, prediction in zip(ids, rows, predictions, strict=True):
            fh.write(json.dumps({"id": pid, "ts": now, "version": manifest["version"], "form": form,
                                 "latency_ms": round(per_row, 4),
                                 "inputs": [_finite(_cell(v, True)) for v in row], "output": _finite(prediction)},
                                allow_nan=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, outbox / name)
    return ids


def upload(root: Path, url: str, token: str, *, outbox: Path | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """Send every kept run to the portal, oldest first, in chunks; a run the portal took moves to ``sent/``. Stops
    at the first failure, leaving that run and the later ones for the next try (ids make a resend harmless)."""
    import urllib.error
    import urllib.request

    if not url.startswith(("http://", "https://")):
        raise PackageError("the portal's URL must start with http:// or https://")
    manifest = json.loads((root / MANIFEST).read_text())
    outbox = outbox or root / OUTBOX
    sent_dir = outbox.parent / SENT if outbox.name == OUTBOX else outbox / SENT
    report: dict[str, Any] = {"files": 0, "records": 0, "pending_files": 0, "error": ""}
    files = sorted(p for p in outbox.glob("*.jsonl")) if outbox.is_dir() else []
    for i, path in enumerate(files):
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for start in range(0, len(records), UPLOAD_CHUNK):
            body = json.dumps({"model": manifest["model"], "records": records[start:start + UPLOAD_CHUNK]}).encode()
            request = urllib.request.Request(url.rstrip("/") + UPLOAD_PATH, data=body, method="POST", headers={  # noqa: S310
                "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 - http(s) only, above
                    answer.read()
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode("utf-8", "replace")[:500]
                report.update(error=f"the portal refused the upload ({exc.code}): {detail}",
                              pending_files=len(files) - i, status=exc.code)
                return report
            except (urllib.error.URLError, OSError) as exc:
                report.update(error=f"the portal could not be reached ({exc}); the predictions stay on this device",
                              pending_files=len(files) - i, status=0)
                return report
        sent_dir.mkdir(parents=True, exist_ok=True)
        os.replace(path, sent_dir / path.name)
        report["files"] += 1
        report["records"] += len(records)
    return report
