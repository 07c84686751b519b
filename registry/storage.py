"""The artifact store: content-addressed blobs on Django's storage API (local files by default, S3 if configured).

Names are generated here from the SHA-256 and never taken from an upload. A blob is never overwritten; reading one
goes through :func:`verified_local_path`, which checks the hash again before anyone uses the bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from django.conf import settings
from django.core.files import File
from django.core.files.storage import Storage, storages
from django.db import transaction

from registry.models import Blob, ModelVersion, ReferenceData

CHUNK = 1024 * 1024


class IntegrityError(Exception):
    """A stored blob no longer matches its hash."""


def artifact_storage() -> Storage:
    return storages["artifacts"]


def storage_name(sha256: str) -> str:
    return f"blobs/{sha256[:2]}/{sha256[2:4]}/{sha256}"


def sha256_of_file(path: str | Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def blob_put(content: IO[bytes] | File, *, sha256: str, size: int) -> Blob:
    """Store ``content`` (already hashed by the caller) unless a blob with that hash exists; return its row."""
    existing = Blob.objects.filter(sha256=sha256).first()
    if existing is not None:
        return existing
    storage = artifact_storage()
    name = storage_name(sha256)
    if storage.exists(name) and not _stored_matches(storage, name, sha256):
        # A file without its row (an interrupted upload) that no longer matches its name: replace it.
        storage.delete(name)
    if not storage.exists(name):
        django_file = content if isinstance(content, File) else File(content)
        saved = storage.save(name, django_file)
        if saved != name:  # a concurrent writer won the race; ours is a duplicate of the same bytes
            storage.delete(saved)
    with transaction.atomic():
        blob, _created = Blob.objects.get_or_create(sha256=sha256, defaults={"size": size, "storage_name": name})
    return blob


def _stored_matches(storage: Storage, name: str, sha256: str) -> bool:
    digest = hashlib.sha256()
    with storage.open(name, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest() == sha256


def blob_put_path(path: str | Path) -> Blob:
    sha, size = sha256_of_file(path)
    with open(path, "rb") as fh:
        return blob_put(fh, sha256=sha, size=size)


@contextlib.contextmanager
def verified_local_path(blob: Blob) -> Iterator[Path]:
    """A local path holding the blob's bytes, checked against its SHA-256 first (a temporary copy for remote stores)."""
    storage = artifact_storage()
    try:
        local = Path(storage.path(blob.storage_name))
    except NotImplementedError:
        local = None
    if local is not None:
        sha, _size = sha256_of_file(local)
        if sha != blob.sha256:
            raise IntegrityError(f"stored blob {blob.sha256[:12]}… no longer matches its hash")
        yield local
        return
    tmp_dir = Path(settings.VAR_DIR) / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, storage.open(blob.storage_name, "rb") as src:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != blob.sha256:
            raise IntegrityError(f"stored blob {blob.sha256[:12]}… no longer matches its hash")
        yield Path(tmp_name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)


def blob_delete_if_unused(blob: Blob) -> bool:
    """Remove a blob that no version or reference data points at (a rejected upload leaves nothing behind)."""
    if ModelVersion.objects.filter(artifact=blob).exists() or ReferenceData.objects.filter(blob=blob).exists():
        return False
    artifact_storage().delete(blob.storage_name)
    Blob.objects.filter(pk=blob.pk).delete()
    return True


def stream_blob(blob: Blob) -> Any:
    """An open file of the blob for streaming a download, after its hash was verified."""
    with verified_local_path(blob):
        pass
    return artifact_storage().open(blob.storage_name, "rb")


@contextlib.contextmanager
def local_path(blob: Blob) -> Iterator[Path]:
    """A local path of the blob's bytes *without* checking its hash: for callers that read every byte anyway and
    check the SHA-256 on the way (the batch planner)."""
    storage = artifact_storage()
    try:
        yield Path(storage.path(blob.storage_name))
        return
    except NotImplementedError:
        pass
    with verified_local_path(blob) as path:
        yield path


def read_range(name: str, start: int, end: int) -> bytes:
    """Bytes ``start`` to ``end`` (exclusive) of a stored file: a seek on local disk, a ranged GET on S3, so a batch
    worker never fetches more than its chunk."""
    storage = artifact_storage()
    if end <= start:
        return b""
    bucket = getattr(storage, "bucket", None)
    if bucket is not None:
        key = getattr(storage, "_normalize_name", lambda n: n)(name)
        return bytes(bucket.Object(key).get(Range=f"bytes={start}-{end - 1}")["Body"].read())
    with storage.open(name, "rb") as fh:
        fh.seek(start)
        return bytes(fh.read(end - start))


def put_work_file(name: str, data: bytes) -> str:
    """Write an intermediate file (a batch chunk's output) under ``name``, replacing any earlier one."""
    from django.core.files.base import ContentFile

    storage = artifact_storage()
    if storage.exists(name):
        storage.delete(name)
    return storage.save(name, ContentFile(data))


def read_work_file(name: str) -> bytes:
    with artifact_storage().open(name, "rb") as fh:
        return bytes(fh.read())


def delete_work_files(prefix: str, *, keep: set[str] | frozenset[str] = frozenset()) -> int:
    """Remove the intermediate files under ``prefix`` (a folder of the store) but those named in ``keep``; returns
    how many went."""
    storage = artifact_storage()
    removed = 0
    try:
        _dirs, files = storage.listdir(prefix)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for name in files:
        full = f"{prefix.rstrip('/')}/{name}"
        if full not in keep:
            storage.delete(full)
            removed += 1
    return removed


def blob_put_moved(path: str | Path, *, sha256: str, size: int) -> Blob:
    """Store a file the caller has just written and hashed, moving rather than copying it where the store is local
    disk (a scored batch result is as big as its input)."""
    from django.core.files.uploadedfile import TemporaryUploadedFile

    class _Moved(TemporaryUploadedFile):
        def __init__(self) -> None:  # only what FileSystemStorage._save needs
            File.__init__(self, open(path, "rb"), name=os.path.basename(str(path)))
            self.size = size

        def temporary_file_path(self) -> str:
            return str(path)

        def close(self) -> None:
            if self.file is not None:
                self.file.close()

    moved = _Moved()
    try:
        return blob_put(moved, sha256=sha256, size=size)
    finally:
        moved.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
