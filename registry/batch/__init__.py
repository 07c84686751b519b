"""Batch scoring: a file scored in chunks by the score workers (services, files, selectors, views, api, tasks)."""
