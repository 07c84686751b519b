"""The edge panel of the model page (``{% edge_panel model %}``): which versions have packages, their forms, and
when the model's devices last reported."""

from __future__ import annotations

from typing import Any

from django import template

from registry.edge import selectors, services

register = template.Library()


@register.inclusion_tag("registry/_edge_panel.html")
def edge_panel(model: Any) -> dict[str, Any]:
    latest: dict[int, Any] = {}
    for package in selectors.package_list(model=model)[:100]:
        latest.setdefault(package.version.number, package)  # newest first: the newest per version
    tokens = list(selectors.token_list(model=model))
    return {"model": model, "packages": [latest[n] for n in sorted(latest, reverse=True)],
            "last_report": services.last_reports(model), "fleets": sum(1 for t in tokens if t.is_active)}
