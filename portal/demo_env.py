"""The demo's own settings file, ``var/demo.env``: what lets the README's commands work from a second terminal.

``make run`` (with ``PORTAL_DEBUG`` on, its default) calls ``python -m portal.demo_env`` first, which writes
``demo.env`` into the var folder once: ``PORTAL_DEBUG=1``, one generated secret set (the secret key, the payload
encryption key, the subject-hash key and the audit signing key's file) and the database and broker URLs ``make run``
was started with. Every later process that uses that var folder (``manage.py`` in another terminal, the web server,
the worker, beat) loads it in ``config.settings`` before reading anything else, and the console script ``portal``
takes the demo's address from it.

What keeps this a demo convenience and not a way around production's rules:

- the file exists only where ``make run`` ran with ``PORTAL_DEBUG`` on; a var folder without it (every production
  one) still refuses to start without explicit secrets;
- an explicit ``PORTAL_DEBUG=0`` (Kubernetes' config map sets it) ignores the file altogether;
- whatever the environment sets explicitly (a variable or its ``_FILE``) wins over the file;
- the file must belong to the user running the process and be readable by them alone (it is written 0600), and
  may hold only the variables listed in ``SETTINGS_KEYS`` and ``CLI_KEYS``: a stray or planted file stops the
  process with ImproperlyConfigured instead of configuring it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import sys
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from portal.env import env_bool, env_int, env_str

FILE_NAME = "demo.env"
BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEYS = ("PORTAL_SECRET_KEY", "PORTAL_PAYLOAD_KEYS", "PORTAL_SUBJECT_HASH_KEY", "PORTAL_AUDIT_SIGNING_KEY_FILE")
URL_KEYS = ("DATABASE_URL", "CELERY_BROKER_URL")
SETTINGS_KEYS = ("PORTAL_DEBUG", *SECRET_KEYS, *URL_KEYS)
CLI_KEYS = ("PORTAL_URL",)  # read by the console script only, never put into the environment
HEADER = """\
# Written by `make run` (PORTAL_DEBUG on): this var folder belongs to a demo. Every manage.py command, the web server,
# the worker, beat and the `portal` console script using this folder read it, so they work from any terminal without
# variables. Production never has this file: delete it (or set PORTAL_DEBUG=0) and explicit secrets are required.
"""


def var_dir() -> Path:
    """The var folder as ``config.settings`` computes it (``PORTAL_VAR_DIR`` or ``./var``)."""
    return Path(env_str("PORTAL_VAR_DIR", str(BASE_DIR / "var"))).resolve()


def _explicitly_off() -> bool:
    value = os.environ.get("PORTAL_DEBUG")
    return value is not None and value.strip() != "" and not env_bool("PORTAL_DEBUG", False)


def read(folder: Path) -> dict[str, str]:
    """The values in ``folder``'s demo file ({} without one), after checking who owns it and who may read it."""
    path = folder / FILE_NAME
    try:
        info = path.stat()
    except FileNotFoundError:
        return {}
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ImproperlyConfigured(f"{path} holds the demo's secrets, so it must belong to you and be readable by you "
                                   "alone (chmod 600); delete it if this is not a demo.")
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or key not in (*SETTINGS_KEYS, *CLI_KEYS):
            raise ImproperlyConfigured(f"{path}, line {number}: only {', '.join((*SETTINGS_KEYS, *CLI_KEYS))} may "
                                       "be set here.")
        values[key] = value
    return values


def load(folder: Path) -> bool:
    """Put the demo file's settings into this process's environment where nothing explicit is set; True when a demo
    file was used. Called by ``config.settings`` before it reads any variable but the var folder's."""
    if _explicitly_off():
        return False
    values = read(folder)
    for key in SETTINGS_KEYS:
        if key not in values:
            continue
        base = key.removesuffix("_FILE")
        if any(os.environ.get(name) for name in (base, f"{base}_FILE")):
            continue  # explicit configuration wins over the demo's
        os.environ[key] = values[key]
    return bool(values)


def cli_value(key: str) -> str | None:
    """A value the console script takes from the demo file (``PORTAL_URL``), or None (no demo, or unreadable)."""
    try:
        return read(var_dir()).get(key) or None
    except (ImproperlyConfigured, OSError, UnicodeDecodeError):
        return None


def _derived(secret_key: str, purpose: str) -> bytes:
    # How config.settings derived these keys before they were written down: a demo folder from that time keeps its
    # encrypted payloads and subject hashes readable.
    return hashlib.sha256(f"{purpose}:{secret_key}".encode()).digest()


def _audit_signing_key(folder: Path) -> Path:
    """The demo's Ed25519 signing key (the file ``portal.audit.signing`` generated before it was named here)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = folder / "audit_signing_key.pem"
    if not path.exists():
        data = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    return path


def write(folder: Path) -> Path:
    """Write (or bring up to date) ``folder``'s demo file. Secrets are generated once and kept; the URLs and the
    address follow the ``make run`` at hand (a URL it was not given is left out, so the embedded defaults apply)."""
    from cryptography.fernet import Fernet

    folder.mkdir(parents=True, exist_ok=True)
    values = read(folder)
    old_key_file = folder / "secret_key"  # the secret key demos kept before this file existed
    old_key = old_key_file.read_text(encoding="utf-8").strip() if old_key_file.exists() else ""
    if "PORTAL_SECRET_KEY" not in values:
        values["PORTAL_SECRET_KEY"] = old_key or secrets.token_urlsafe(64)
    if "PORTAL_PAYLOAD_KEYS" not in values:
        values["PORTAL_PAYLOAD_KEYS"] = (base64.urlsafe_b64encode(_derived(old_key, "payload-key")).decode()
                                         if old_key else Fernet.generate_key().decode())
    if "PORTAL_SUBJECT_HASH_KEY" not in values:
        values["PORTAL_SUBJECT_HASH_KEY"] = (_derived(old_key, "subject-hash").hex() if old_key
                                             else secrets.token_hex(32))
    values["PORTAL_AUDIT_SIGNING_KEY_FILE"] = str(_audit_signing_key(folder))
    values["PORTAL_DEBUG"] = "1"
    for key in URL_KEYS:
        current = os.environ.get(key)
        if current:
            values[key] = current
        else:
            values.pop(key, None)
    host = env_str("PORTAL_BIND_HOST", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104 - only to name a reachable address
    values["PORTAL_URL"] = f"http://{host}:{env_int('PORT', 8000, minimum=1, maximum=65535)}"
    body = HEADER + "".join(f"{key}={values[key]}\n" for key in (*SETTINGS_KEYS, *CLI_KEYS) if key in values)
    path = folder / FILE_NAME
    temporary = folder / f".{FILE_NAME}.{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(body)
    os.replace(temporary, path)  # never half a file, and never readable by others even for a moment
    return path


def main() -> int:
    """``make run``'s first step. Writes nothing unless ``PORTAL_DEBUG`` is on: a production-style ``make run``
    (``PORTAL_DEBUG=0``) keeps needing explicit secrets."""
    try:
        if not env_bool("PORTAL_DEBUG", False):
            print("PORTAL_DEBUG is off: no demo settings written (give the secrets explicitly).")
            return 0
        path = write(var_dir())
    except ImproperlyConfigured as exc:
        print(f"demo settings: {exc}", file=sys.stderr)
        return 1
    print(f"Demo settings in {path}: manage.py and the portal command find them from any terminal.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
