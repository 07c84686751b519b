"""The environments a model is deployed to, in promotion order: the one table the models' choices, the API's and the
CLI's arguments and MLflow's aliases are written from. A leaf (no Django), so the ``portal`` CLI can read it too."""

from __future__ import annotations

ENVIRONMENTS = ("dev", "stage", "prod")
# Where a version can be promoted to (dev is deployed to directly).
PROMOTION_TARGETS = ENVIRONMENTS[1:]
