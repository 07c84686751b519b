"""API token format: ``mlp_`` + 40 url-safe random characters. Only the SHA-256 is kept."""

from __future__ import annotations

import hashlib
import secrets

PREFIX = "mlp_"


def generate_token() -> str:
    return PREFIX + secrets.token_urlsafe(30)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()
