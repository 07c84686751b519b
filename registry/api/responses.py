"""API responses the registry's features share: a stored file as a download, and the upload limit's 413."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.http import FileResponse
from rest_framework import status
from rest_framework.response import Response

from portal.api.errors import error_body
from registry import storage

logger = logging.getLogger(__name__)


def too_large_response() -> Response:
    limit_mb = settings.PORTAL_MAX_UPLOAD_BYTES // (1024 * 1024)
    return Response(error_body("too_large", f"The file is larger than the upload limit of {limit_mb} MB.",
                               {"limit_bytes": settings.PORTAL_MAX_UPLOAD_BYTES}),
                    status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)


def blob_download(blob: Any, filename: str) -> Any:
    """A stored file as an attachment, its SHA-256 checked on the way out (a mismatch is a 500 naming it)."""
    try:
        handle = storage.stream_blob(blob)
    except storage.IntegrityError as exc:
        logger.error("Refused to serve %s: %s", filename, exc)
        return Response(error_body("integrity_error", "The stored file no longer matches its SHA-256, so it is not "
                                   "served. An administrator has to restore it from backup.", {"sha256": blob.sha256}),
                        status=status.HTTP_500_INTERNAL_SERVER_ERROR)
    response = FileResponse(handle, as_attachment=True, filename=filename, content_type="application/octet-stream")
    response["X-Content-SHA256"] = blob.sha256
    return response
