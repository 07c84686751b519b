"""Promotions' background work. The registered names stay ``registry.tasks.*``, as the beat schedule names them."""

from __future__ import annotations

from celery import shared_task

from registry.promotions import services


@shared_task(name="registry.tasks.promotions_recheck", ignore_result=True)
def promotions_recheck_task() -> list[str]:
    """Blocked requests whose gates have cleared: their approvers are asked now."""
    return services.promotions_recheck_blocked()
