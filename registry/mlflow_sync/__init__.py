"""MLflow <-> portal sync: registry webhooks in, environment aliases out (see services)."""
