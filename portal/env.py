"""Typed readers for environment variables.

Every reader fails fast with ``ImproperlyConfigured`` naming the variable and what it expected, so a typo in a
deployment manifest stops the process at start-up instead of surfacing later as odd behaviour. Any variable may
instead be given as ``NAME_FILE`` (a path whose content is the value), which is how Docker and Kubernetes secrets
arrive; giving both is an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def raw(name: str) -> str | None:
    """The value of ``name`` or of the file named by ``name_FILE``; None when neither is set (or empty)."""
    direct = os.environ.get(name)
    file_name = os.environ.get(f"{name}_FILE")
    if direct not in (None, "") and file_name not in (None, ""):
        raise ImproperlyConfigured(f"Set either {name} or {name}_FILE, not both.")
    if file_name:
        path = Path(file_name)
        try:
            value = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE={file_name!r} cannot be read: {exc.strerror}.") from exc
        # Secret files conventionally end with a newline that is not part of the secret.
        return value.rstrip("\r\n")
    if direct in (None, ""):
        return None
    return direct


def env_str(name: str, default: str | None = None, *, required: bool = False) -> str:
    value = raw(name)
    if value is None:
        if required or default is None:
            raise ImproperlyConfigured(f"{name} must be set.")
        return default
    return value


def env_optional(name: str) -> str | None:
    return raw(name)


def env_bool(name: str, default: bool) -> bool:
    value = raw(name)
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean: use one of 1/0, true/false, yes/no, on/off.")


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    value = raw(name)
    if value is None:
        result = default
    else:
        try:
            result = int(value.strip())
        except ValueError as exc:
            raise ImproperlyConfigured(f"{name}={value!r} is not a whole number.") from exc
    if minimum is not None and result < minimum:
        raise ImproperlyConfigured(f"{name}={result} is below its minimum of {minimum}.")
    if maximum is not None and result > maximum:
        raise ImproperlyConfigured(f"{name}={result} is above its maximum of {maximum}.")
    return result


def env_float(name: str, default: float, *, minimum: float, maximum: float) -> float:
    value = raw(name)
    try:
        result = default if value is None else float(value.strip())
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}={value!r} is not a number.") from exc
    if not minimum <= result <= maximum:
        raise ImproperlyConfigured(f"{name}={result} is outside {minimum} to {maximum}.")
    return result


def env_list(name: str, default: list[str]) -> list[str]:
    value = raw(name)
    if value is None:
        return list(default)
    return [item.strip() for item in value.split(",") if item.strip()]


def env_url(name: str, default: str | None, *, schemes: set[str]) -> str | None:
    value = raw(name)
    if value is None:
        return default
    scheme = urlsplit(value).scheme.lower()
    if scheme not in schemes:
        allowed = ", ".join(sorted(schemes))
        raise ImproperlyConfigured(f"{name} has scheme {scheme or '(none)'!r}; expected one of: {allowed}.")
    return value


def env_choice(name: str, default: str, *, choices: set[str]) -> str:
    value = (raw(name) or default).strip()
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} is not one of: {', '.join(sorted(choices))}.")
    return value
