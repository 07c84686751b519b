"""Start-up check: can this host start the model sandbox? Without it, artifacts whose loaders run code are never
loaded (scans wait, deployments of such versions fail, their hosts answer 503), so say it once, loudly, at start."""

from __future__ import annotations

from typing import Any

from django.core.checks import CheckMessage, Warning, register

from registry.sandbox import unavailable_reason


@register()
def sandbox_available(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    reason = unavailable_reason()
    if reason is None:
        return []
    return [Warning(
        f"The model sandbox cannot start on this host: {reason}.",
        hint="Uploaded pickle, joblib, skops and MLflow models are not loaded here until it can (ONNX still "
             "serves). See the README's 'Model isolation' section.",
        id="registry.W001")]
