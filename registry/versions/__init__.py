"""Registered models and their versions: registration, upload, the sandboxed scan, trust, tags, MLflow import (services, selectors, views, api, tasks)."""
