"""Datasets panels on the registry's pages (the registry's templates load them by name; its Python never imports
monitoring): ``{% version_lineage version %}`` and ``{% retraining_panel model %}``."""

from __future__ import annotations

from typing import Any

from django import template

from monitoring.datasets import selectors

register = template.Library()


@register.inclusion_tag("monitoring/datasets/_version_lineage.html")
def version_lineage(version: Any) -> dict[str, Any]:
    return {"lineage": selectors.version_lineage(version)}


@register.inclusion_tag("monitoring/datasets/_model_panel.html", takes_context=True)
def retraining_panel(context: Any, model: Any) -> dict[str, Any]:
    return {"model": model, "requests": [selectors.request_data(r) for r in selectors.request_list(model=model,
                                                                                                   limit=5)],
            "may_manage": False, "request": context.get("request")}
