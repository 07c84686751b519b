"""Beat's stop rule: every running experiment analysed, its guardrails checked, its verdict acted on."""

from __future__ import annotations

from celery import shared_task

from monitoring.experiments.services import experiments_check


@shared_task(name="monitoring.tasks.experiments_check", ignore_result=True)
def experiments_check_task() -> dict[str, int]:
    return experiments_check()
