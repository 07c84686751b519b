"""Promotions: a version moved towards production through gates and approvals, rolled back, its history (services, views, api)."""
