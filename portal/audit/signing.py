"""The audit trail's Ed25519 key: it signs every export's manifest and every checkpoint. ``ed25519_key`` is the one
loader of the portal's Ed25519 keys (this one and the edge packages' ``registry.edge.signing``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


def ed25519_key(pem: str, *, setting: str, demo_file: str, missing: str) -> Ed25519PrivateKey:
    """The key in ``pem`` (the value of ``setting``), else, in the demo only, one generated once as ``demo_file``
    under ``var/`` (the first of several processes to make it wins; the others read theirs). ``missing``: why the
    setting is needed, raised when it is empty and PORTAL_DEBUG is off."""
    if not pem and not getattr(settings, "PORTAL_DEBUG", settings.DEBUG):
        raise ImproperlyConfigured(missing)
    if not pem:
        path = Path(settings.VAR_DIR) / demo_file
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            key = Ed25519PrivateKey.generate()
            data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process made it first: use theirs
                pass
            else:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
        pem = path.read_text()
    loaded = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ImproperlyConfigured(f"{setting} must be an Ed25519 private key in PEM (PKCS#8)")
    return loaded


def public_pem(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def fingerprint(key: Ed25519PrivateKey) -> str:
    """SHA-256 of the raw public key."""
    return hashlib.sha256(key.public_key().public_bytes(serialization.Encoding.Raw,
                                                        serialization.PublicFormat.Raw)).hexdigest()


def signing_key() -> Ed25519PrivateKey:
    """The key that signs exports and checkpoints: ``PORTAL_AUDIT_SIGNING_KEY`` (PEM), else, in the demo only, one
    generated once under ``var/``. A key made up per host would sign with a different key on every pod
    (portal/checks.py says so at start)."""
    return ed25519_key(settings.PORTAL_AUDIT_SIGNING_KEY, setting="PORTAL_AUDIT_SIGNING_KEY",
                       demo_file="audit_signing_key.pem",
                       missing="PORTAL_AUDIT_SIGNING_KEY (or PORTAL_AUDIT_SIGNING_KEY_FILE) must be set when "
                               "PORTAL_DEBUG is off.")


def public_key_pem() -> str:
    return public_pem(signing_key())


def public_key_fingerprint() -> str:
    return fingerprint(signing_key())
