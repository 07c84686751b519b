"""The audit trail's Ed25519 key: it signs every export's manifest and every checkpoint."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


def signing_key() -> Ed25519PrivateKey:
    """The key that signs exports and checkpoints: ``PORTAL_AUDIT_SIGNING_KEY`` (PEM), else, in the demo only, one
    generated once under ``var/``."""
    pem = settings.PORTAL_AUDIT_SIGNING_KEY
    if not pem and not getattr(settings, "PORTAL_DEBUG", settings.DEBUG):
        # A key made up per host would sign with a different key on every pod (portal/checks.py says so at start).
        raise ImproperlyConfigured("PORTAL_AUDIT_SIGNING_KEY (or PORTAL_AUDIT_SIGNING_KEY_FILE) must be set when "
                                   "PORTAL_DEBUG is off.")
    if not pem:
        path = Path(settings.VAR_DIR) / "audit_signing_key.pem"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            key = Ed25519PrivateKey.generate()
            data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        pem = path.read_text()
    loaded = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ValueError("PORTAL_AUDIT_SIGNING_KEY must be an Ed25519 private key in PEM (PKCS#8)")
    return loaded


def public_key_pem() -> str:
    return signing_key().public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def public_key_fingerprint() -> str:
    raw = signing_key().public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()
