"""The Celery application: configured from Django settings (``CELERY_*``), tasks found in each app's tasks.py."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("portal")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
# The registry keeps its tasks with each feature (registry/<feature>/tasks.py).
app.autodiscover_tasks(["registry.versions", "registry.deployments", "registry.batch", "registry.mlflow_sync",
                        "registry.promotions", "registry.edge",
                        "monitoring.datasets"])
