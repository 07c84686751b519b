"""The archive gate: what a zip may contain before any member is looked at, and a budgeted extraction.

Refused: absolute paths, drive letters, ``..`` and backslashes in names, symlinks, device files and FIFOs,
encrypted members, duplicate names, more members than allowed, more bytes than allowed once unpacked, compression
ratios typical of bombs, and members whose real size exceeds what their header declared (a lying header).
"""

from __future__ import annotations

import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from django.conf import settings

from registry.scanning.findings import Finding, UploadRejected

_DRIVE = re.compile(r"^[A-Za-z]:")
RATIO_CHECK_MIN_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True)
class Limits:
    max_members: int
    max_unpacked: int
    max_ratio: int

    @classmethod
    def from_settings(cls) -> Limits:
        return cls(settings.PORTAL_MAX_ARCHIVE_MEMBERS, settings.PORTAL_MAX_UNPACKED_BYTES,
                   settings.PORTAL_MAX_COMPRESSION_RATIO)


def _name_problem(name: str) -> str | None:
    if "\x00" in name:
        return "has a NUL byte in its name"
    if "\\" in name:
        return "uses a backslash in its path (a Windows path-traversal trick)"
    if name.startswith("/") or _DRIVE.match(name):
        return "has an absolute path"
    parts = PurePosixPath(name).parts
    if ".." in parts:
        return "climbs out of the archive with '..'"
    if not name.strip("/"):
        return "has an empty name"
    return None


def check_zip(path: Path, *, limits: Limits | None = None, label: str = "") -> list[zipfile.ZipInfo]:
    """Check a zip's directory against the gate; return its members or raise UploadRejected naming each problem."""
    limits = limits or Limits.from_settings()
    prefix = f"{label}: " if label else ""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UploadRejected([Finding("block", "corrupt_archive", f"{prefix}the zip file is corrupt or truncated ({exc}).")]) from None
    with archive:
        infos = archive.infolist()
    findings: list[Finding] = []
    if len(infos) > limits.max_members:
        findings.append(Finding("block", "too_many_members",
                                f"{prefix}the archive has {len(infos)} files; the limit is {limits.max_members}."))
    seen: set[str] = set()
    declared_total = 0
    compressed_total = 0
    for info in infos:
        name = info.filename
        problem = _name_problem(name)
        if problem:
            findings.append(Finding("block", "unsafe_path", f"{prefix}{name!r} {problem}.", name))
            continue
        normalised = str(PurePosixPath(name))
        if normalised in seen:
            findings.append(Finding("block", "duplicate_member", f"{prefix}{name!r} appears twice in the archive.", name))
        seen.add(normalised)
        mode = (info.external_attr >> 16) & 0xFFFF
        if stat.S_ISLNK(mode):
            findings.append(Finding("block", "symlink", f"{prefix}{name!r} is a symbolic link; links are not accepted.", name))
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            findings.append(Finding("block", "special_file", f"{prefix}{name!r} is a device or pipe, not a file.", name))
        if info.flag_bits & 0x1:
            findings.append(Finding("block", "encrypted", f"{prefix}{name!r} is encrypted; upload it unencrypted.", name))
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
            findings.append(Finding("block", "compression", f"{prefix}{name!r} uses an unsupported compression method.", name))
        declared_total += info.file_size
        compressed_total += info.compress_size
        if info.file_size > RATIO_CHECK_MIN_BYTES and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            findings.append(Finding("block", "zip_bomb",
                                    f"{prefix}{name!r} expands {info.file_size // max(info.compress_size, 1)}-fold, "
                                    "the signature of a zip bomb.", name))
    if declared_total > limits.max_unpacked:
        findings.append(Finding("block", "too_large_unpacked",
                                f"{prefix}the archive unpacks to {declared_total} bytes; the limit is {limits.max_unpacked}."))
    if findings:
        raise UploadRejected(findings)
    return infos


def extract_zip(path: Path, dest: Path, *, limits: Limits | None = None) -> list[Path]:
    """Extract a zip that passed :func:`check_zip`, counting real bytes against the declared sizes and the budget."""
    limits = limits or Limits.from_settings()
    infos = check_zip(path, limits=limits)
    dest = dest.resolve()
    written_total = 0
    files: list[Path] = []
    with zipfile.ZipFile(path) as archive:
        for info in infos:
            target = (dest / info.filename).resolve()
            if dest not in target.parents and target != dest:
                raise UploadRejected([Finding("block", "unsafe_path", f"{info.filename!r} would land outside the archive.",
                                              info.filename)])
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            try:
                with archive.open(info) as src, open(target, "xb") as out:
                    while chunk := src.read(1024 * 1024):
                        written += len(chunk)
                        written_total += len(chunk)
                        if written > info.file_size or written_total > limits.max_unpacked:
                            raise UploadRejected([Finding("block", "zip_bomb",
                                                          f"{info.filename!r} unpacks to more than its header declares.",
                                                          info.filename)])
                        out.write(chunk)
            except (zipfile.BadZipFile, EOFError, OSError, RuntimeError) as exc:
                if isinstance(exc, FileExistsError):
                    raise UploadRejected([Finding("block", "duplicate_member", f"{info.filename!r} appears twice.",
                                                  info.filename)]) from None
                raise UploadRejected([Finding("block", "corrupt_archive",
                                              f"{info.filename!r} cannot be unpacked ({exc}).", info.filename)]) from None
            files.append(target)
    return files
