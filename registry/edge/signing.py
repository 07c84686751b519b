"""The Ed25519 key that signs edge packages' manifests (``PORTAL_EDGE_SIGNING_KEY``), kept apart from the audit key:
what it signs leaves the portal on every device."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

DEMO_KEY_FILE = "edge_signing_key.pem"


def signing_key() -> Ed25519PrivateKey:
    """``PORTAL_EDGE_SIGNING_KEY`` (PEM), else, in the demo only, one generated once under ``var/``."""
    pem = settings.PORTAL_EDGE_SIGNING_KEY
    if not pem and not getattr(settings, "PORTAL_DEBUG", settings.DEBUG):
        # A key made up per host would sign each worker's packages with another key, and devices trust one.
        raise ImproperlyConfigured("PORTAL_EDGE_SIGNING_KEY (or PORTAL_EDGE_SIGNING_KEY_FILE) must be set to build "
                                   "edge packages when PORTAL_DEBUG is off.")
    if not pem:
        path = Path(settings.VAR_DIR) / DEMO_KEY_FILE
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            key = Ed25519PrivateKey.generate()
            data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another worker made it first: use theirs
                pass
            else:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
        pem = path.read_text()
    loaded = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ImproperlyConfigured("PORTAL_EDGE_SIGNING_KEY must be an Ed25519 private key in PEM (PKCS#8)")
    return loaded


def public_key_pem() -> str:
    return signing_key().public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def public_key_fingerprint() -> str:
    """SHA-256 of the raw public key: what ``python -m portal_edge verify`` prints."""
    raw = signing_key().public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def sign(data: bytes) -> bytes:
    return signing_key().sign(data)
