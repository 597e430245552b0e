"""The only worker modules that import celery or kombu; ``worker.celery.app`` is the app."""
