"""Deployments: a version made to serve an environment, carried out by the deploy workers (services, tasks)."""
