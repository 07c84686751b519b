"""Upload handler that streams every uploaded file to disk and hashes it on the way (one pass, constant memory)."""

from __future__ import annotations

import hashlib
from typing import Any

from django.conf import settings
from django.core.files.uploadhandler import StopUpload, TemporaryFileUploadHandler

from registry.tabular import BatchInputError, CsvPlanner


class HashingUploadHandler(TemporaryFileUploadHandler):
    def new_file(self, *args: Any, **kwargs: Any) -> None:
        super().new_file(*args, **kwargs)
        self._digest = hashlib.sha256()
        self._received = 0
        # A batch input is cut into chunks on the way in, so its job can start scoring without reading it again.
        self._planner: Any = None
        if self.request is not None and self.request.path.startswith("/api/v1/batch-jobs"):
            self._planner = CsvPlanner(settings.PORTAL_BATCH_CHUNK_BYTES, digest=False)

    def receive_data_chunk(self, raw_data: bytes, start: int) -> None:
        self._received += len(raw_data)
        if self._received > settings.PORTAL_MAX_UPLOAD_BYTES:
            # Mark the request so the view can answer 413 with the limit, then stop reading the body.
            self.request.portal_upload_too_large = True  # type: ignore[union-attr]
            self.file.close()
            raise StopUpload(connection_reset=True)
        self._digest.update(raw_data)
        if self._planner is not None:
            self._plan(raw_data)
        super().receive_data_chunk(raw_data, start)

    def _plan(self, raw_data: bytes) -> None:
        if b"\x00" in raw_data or (self._received == len(raw_data) and raw_data.startswith(b"PAR1")):
            self._planner = None  # binary (Parquet): nothing to cut here
            return
        try:
            self._planner.feed(raw_data)
        except BatchInputError:
            self._planner = None  # not a CSV we can cut; the submission checks say why, or a worker plans it

    def file_complete(self, file_size: int) -> Any:
        uploaded = super().file_complete(file_size)
        if uploaded is not None:
            uploaded.sha256 = self._digest.hexdigest()  # type: ignore[attr-defined]
            uploaded.csv_plan = None  # type: ignore[attr-defined]
            if self._planner is not None:
                try:
                    plan = self._planner.finish()
                    plan.sha256 = uploaded.sha256  # type: ignore[attr-defined]
                    uploaded.csv_plan = plan  # type: ignore[attr-defined]
                except BatchInputError:
                    pass
        return uploaded
