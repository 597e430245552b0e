"""The contract producers and workers share: jobs and results, chunk messages, Redis keys and the
ledger, errors, connection and S3 settings, the Celery configuration. Torch-free."""
