"""The Ed25519 key that signs edge packages' manifests (``PORTAL_EDGE_SIGNING_KEY``), kept apart from the audit key:
what it signs leaves the portal on every device. Loaded as the portal's other Ed25519 key is
(``portal.audit.signing.ed25519_key``)."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.conf import settings

from portal.audit.signing import ed25519_key, fingerprint, public_pem

DEMO_KEY_FILE = "edge_signing_key.pem"


def signing_key() -> Ed25519PrivateKey:
    """``PORTAL_EDGE_SIGNING_KEY`` (PEM), else, in the demo only, one generated once under ``var/``. A key made up per
    host would sign each worker's packages with another key, and devices trust one."""
    return ed25519_key(settings.PORTAL_EDGE_SIGNING_KEY, setting="PORTAL_EDGE_SIGNING_KEY", demo_file=DEMO_KEY_FILE,
                       missing="PORTAL_EDGE_SIGNING_KEY (or PORTAL_EDGE_SIGNING_KEY_FILE) must be set to build edge "
                               "packages when PORTAL_DEBUG is off.")


def public_key_pem() -> str:
    return public_pem(signing_key())


def public_key_fingerprint() -> str:
    """SHA-256 of the raw public key: what ``python -m portal_edge verify`` prints."""
    return fingerprint(signing_key())


def sign(data: bytes) -> bytes:
    return signing_key().sign(data)
