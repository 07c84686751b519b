"""Conformance with MLflow's own scoring server: every test of test_mlflow_conformance.py, for the models that file
names for this one in ``SPLIT`` (its own file, so that the other test process can take it)."""

from tests.registry.serving.test_mlflow_conformance import *  # noqa: F403 - the tests, fixtures and marks
from tests.registry.serving.test_mlflow_conformance import SPLIT

CONFORMANCE_MODELS = SPLIT["test_mlflow_conformance_trees"]
