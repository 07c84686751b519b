"""Start-up check: outside the demo, the keys that protect data at rest must be given, never made up.

Left unset, the payload encryption keys and the subject-hash key are derived from ``SECRET_KEY`` and the audit
signing key generates itself under ``var/``: rotating a leaked secret key would then make encrypted payloads
unreadable and break the subject lookups GDPR erasure depends on, and every pod would sign with a key of its own.
So with ``PORTAL_DEBUG`` off each of them must be set explicitly (or its ``_FILE``): ``manage.py check``,
``migrate`` (the deployment's migration job) and ``runserver`` stop naming each missing one, and ``/readyz`` answers
503 until they are set.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, register

EXPLICIT_KEYS = {
    "PORTAL_PAYLOAD_KEYS": ("portal.E101", "Fernet keys encrypting sensitive payload columns",
                            "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"),
    "PORTAL_SUBJECT_HASH_KEY": ("portal.E102", "key of the HMAC that names data subjects",
                                "python -c 'import secrets; print(secrets.token_hex(32))'"),
    "PORTAL_AUDIT_SIGNING_KEY": ("portal.E103", "Ed25519 key signing audit exports and checkpoints",
                                 "openssl genpkey -algorithm ed25519"),
}


def keys_not_set() -> list[str]:
    """The keys that production must set and this process was not given ([] in the demo)."""
    if getattr(settings, "PORTAL_DEBUG", settings.DEBUG):
        return []
    return [name for name in EXPLICIT_KEYS if name in getattr(settings, "PORTAL_KEYS_NOT_SET", ())]


@register(Tags.security)
def explicit_keys(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    for name in keys_not_set():
        check_id, what, make = EXPLICIT_KEYS[name]
        messages.append(Error(
            f"{name} is not set: with PORTAL_DEBUG off the {what} must be given explicitly, not derived from the "
            f"secret key or generated on this host.",
            hint=f"Set {name} or {name}_FILE (a mounted secret); make one with: {make}", id=check_id))
    return messages
