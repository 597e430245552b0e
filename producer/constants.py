"""Names shared by producers and workers: queues, task names, Redis keys, and their defaults."""

from __future__ import annotations

QUEUE_PREFIX = "blipq."
"""Every job kind has its own queue, ``blipq.<kind>`` (e.g. ``blipq.caption``)."""

TASK_RUN_JOB = "blipq.run_job"
"""The Celery task name of one job; the task id is the job id."""

RESULTS_STREAM = "blipq:results"
"""Redis stream with one entry per finished job (job id, status, the result as JSON)."""

RESULTS_STREAM_MAXLEN = 100_000
"""Approximate cap on the results stream (``XADD MAXLEN ~``): old entries are trimmed."""

PUBLISHED_KEY = "blipq:published:{job_id}"
"""Set when a job's event is on the results stream, so a redelivered job is not announced twice."""

DELIVERIES_KEY = "blipq:deliveries:{job_id}"
"""Counts starts of a job that have not finished; too many means the job kills workers."""

DEAD_LETTER = "blipq:dead"
"""List of JSON records (job id, payload, reason) of poison jobs, newest first."""

RESULT_EXPIRES_S = 86_400
"""Seconds a result stays in the result backend."""

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
"""Broker and result backend when nothing is configured."""

SUBMIT_CHUNK = 500
"""Jobs sent per Redis round trip by ``Client.submit_many``."""


def queue_for(kind: str) -> str:
    """The queue of a job kind."""
    return f"{QUEUE_PREFIX}{kind}"
