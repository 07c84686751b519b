"""What a file is, by its first bytes: the name a person gave it is only a claim to check against this."""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import zlib
from pathlib import Path

from registry.scanning.findings import Finding, UploadRejected

_PROTOCOL0_PICKLE = re.compile(rb"^\(?[ci][A-Za-z_][\w.]*\n[A-Za-z_][\w.]*\n")

ZIP = "zip"
PICKLE = "pickle"
COMPRESSED = "compressed"  # a joblib file compressed with zlib, gzip, bz2, xz/lzma
ONNX = "onnx"
TEXT = "text"
PARQUET = "parquet"
UNKNOWN = "unknown"

EXPECTED_BY_EXTENSION = {
    ".zip": {ZIP}, ".skops": {ZIP}, ".onnx": {ONNX}, ".pkl": {PICKLE}, ".pickle": {PICKLE},
    ".joblib": {PICKLE, COMPRESSED},
}


def sniff(head: bytes) -> str:
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return ZIP
    if len(head) >= 2 and head[0] == 0x80 and head[1] <= 5:
        return PICKLE
    if _PROTOCOL0_PICKLE.match(head):
        return PICKLE
    if head.startswith((b"\x78\x01", b"\x78\x5e", b"\x78\x9c", b"\x78\xda", b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00",
                        b"\x5d\x00\x00")):
        return COMPRESSED
    if head.startswith(b"PAR1"):
        return PARQUET
    # An ONNX ModelProto starts with field 1 (ir_version, a varint): tag byte 0x08.
    if head[:1] == b"\x08" and len(head) > 2:
        return ONNX
    try:
        head.decode("utf-8")
        return TEXT
    except UnicodeDecodeError:
        # A multi-byte character cut at the end of the sample is still text.
        try:
            head[:-3].decode("utf-8")
            return TEXT
        except UnicodeDecodeError:
            return UNKNOWN


def sniff_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return sniff(fh.read(64))


def decompress_to(path: Path, dest: Path, *, limit: int) -> Path:
    """Decompress a compressed joblib file to ``dest``, refusing to write more than ``limit`` bytes (a bomb)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    written = 0
    out_path = dest
    with open(out_path, "wb") as out:
        if head.startswith(b"\x78"):
            decomp = zlib.decompressobj()
            with open(path, "rb") as src:
                while chunk := src.read(1024 * 1024):
                    data = decomp.decompress(chunk, limit + 1 - written)
                    written += len(data)
                    if written > limit or decomp.unconsumed_tail:
                        raise _bomb()
                    out.write(data)
            return out_path
        opener = {b"\x1f\x8b": gzip.open, b"BZ": bz2.open}.get(head[:2], lzma.open)
        try:
            with opener(path, "rb") as src:  # type: ignore[operator]
                while chunk := src.read(1024 * 1024):
                    written += len(chunk)
                    if written > limit:
                        raise _bomb()
                    out.write(chunk)
        except (OSError, EOFError, lzma.LZMAError) as exc:
            raise UploadRejected([Finding("block", "corrupt_file", f"the compressed file is corrupt ({exc}).")]) from None
    return out_path


def _bomb() -> UploadRejected:
    return UploadRejected([Finding("block", "decompression_bomb",
                                   "the file decompresses to more than the portal's unpacked-size limit.")])
