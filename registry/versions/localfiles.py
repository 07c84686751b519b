"""Hand a file on local disk to the upload service as if it had been uploaded (seeding, imports)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile

from registry.storage import sha256_of_file


class LocalUpload(UploadedFile):
    """An UploadedFile backed by a private copy on disk (the artifact store may move it into place)."""

    def __init__(self, path: Path, name: str) -> None:
        tmp_dir = Path(settings.FILE_UPLOAD_TEMP_DIR)
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, copy = tempfile.mkstemp(dir=tmp_dir, suffix=".upload")
        with open(fd, "wb") as out, open(path, "rb") as src:
            shutil.copyfileobj(src, out, 1024 * 1024)
        self._path = copy
        self.sha256, size = sha256_of_file(copy)
        super().__init__(open(copy, "rb"), name=name, content_type="application/octet-stream", size=size)

    def temporary_file_path(self) -> str:
        return self._path

    def close(self) -> None:
        super().close()
        Path(self._path).unlink(missing_ok=True)
