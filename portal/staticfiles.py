"""Static files as the demo and production serve them: hashed names, gzip and Brotli copies (WhiteNoise).

Django's manifest storage hands out plain names while DEBUG is on, so ``make run`` (a DEBUG demo) served
uncompressed files with ``max-age=0``: 1.4 MB of plotly.js on every page view. This storage hands out the hashed
names whenever ``collectstatic`` has written them (``make run`` always runs it), which WhiteNoise serves compressed
and cached for a year as immutable; without a collected copy (``runserver`` on a fresh checkout) it falls back to
the plain name, which WhiteNoise finds through the finders.
"""

from __future__ import annotations

from typing import Any

from whitenoise.storage import CompressedManifestStaticFilesStorage


class StaticFilesStorage(CompressedManifestStaticFilesStorage):
    manifest_strict = False

    def url(self, name: Any, force: bool = False) -> str:
        try:
            return super().url(name, force=True)
        except ValueError:  # not collected yet
            return super().url(name, force=False)
