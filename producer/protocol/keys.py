"""Names shared by producers and workers: queues, task names, Redis keys, and their defaults."""

from __future__ import annotations

QUEUE_PREFIX = "blipq."
"""Every model has its own queue, ``blipq.<model>`` (e.g. ``blipq.caption-base``): a job waits
in the queue of the model it names, whatever its kind, so only a worker serving that model takes
it (a BLIP-2 model's caption and VQA jobs share its one queue)."""

TASK_RUN_JOB = "blipq.run_job"
"""The Celery task name of one job; the task id is the job id."""

TASK_RUN_CHUNK = "blipq.run_chunk"
"""The Celery task name of a chunk message: several jobs of one kind in one broker message
(``producer.protocol.chunks``). The task id is the chunk's own id (no result is stored under
it); every job in it keeps its own id, ledger entry, result and stream event."""

CHUNK_JOBS_HEADER = "blipq_jobs"
"""Message header of a chunk message: the ids of its jobs, in order, so the reaper and a worker
refusing the message can name them without decoding the body."""

JOBS_PER_MESSAGE = 1
"""Default jobs per broker message in ``Client.submit_many`` and bulk runs: one (no chunks), so
producers work with workers that predate chunk messages."""

MAX_JOBS_PER_MESSAGE = 1000
"""Most jobs one chunk message may carry; a worker answers every job of a bigger one with
``invalid_job``."""

RESULTS_STREAM = "blipq:results"
"""Redis stream with one entry per finished job (job id, status, the result as JSON)."""

PUBLISHED_KEY = "blipq:published:{job_id}"
"""Set when a job's event is on the results stream, so a redelivered job is not announced twice."""

DELIVERIES_KEY = "blipq:deliveries:{job_id}"
"""Counts starts of a job that have not finished; too many means the job kills workers."""

CHUNK_STARTED_KEY = "blipq:chunk:{chunk_id}"
"""Set when a worker first starts a chunk message (kept until it expires): a chunk that finds it
set is a redelivery, whose unanswered jobs are sent on as messages of their own."""

DEAD_LETTER = "blipq:dead"
"""List of JSON records (job id, payload, reason) of poison jobs, newest first."""

LEDGER = "blipq:ledger"
"""Sorted set of unfinished job ids scored by submission time (Unix seconds). Written by the
producer before the message is sent, cleared by the worker when the result is stored; the
worker's reaper re-sends jobs that a dying consumer took off a Redis queue and lost."""

LEDGER_PAYLOADS = "blipq:ledger:payloads"
"""Hash job id -> the task's JSON kwargs, so a lost job can be sent again unchanged."""

REAPER_LOCK = "blipq:reaper:lock"
"""Held (SET NX EX) by the one worker that sweeps the ledger at a time."""

RESULT_EXPIRES_S = 86_400
"""Seconds a result stays in the result backend."""

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
"""Broker and result backend when nothing is configured."""

SUBMIT_CHUNK = 500
"""Jobs sent per Redis round trip by ``Client.submit_many``."""


KOMBU_UNACKED = "unacked"
"""kombu's Redis transport: the hash of delivered, unacknowledged messages (tag -> [message,
exchange, routing key]). A kombu internal, read by the reaper; named here alone."""

KOMBU_PRIORITY_SEP = "\x06\x16"
"""kombu's Redis transport keeps priorities 3, 6 and 9 in sub-queues named queue + this + step.
A kombu internal, read to count queue depths; named here alone."""

KOMBU_PRIORITY_STEPS = (3, 6, 9)
"""The priority sub-queues kombu's Redis transport keeps beside each queue."""

KOMBU_BINDING_PREFIX = "_kombu.binding."
"""kombu's Redis transport: a set per exchange naming the queues bound to it (an exchange is
named as its queue here), written when a worker or producer declares a queue. A kombu internal,
read to list the declared queues; named here alone."""


def text(value: bytes | str) -> str:
    """A Redis reply (a key, a member, an id) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def queue_for(model: str) -> str:
    """The queue of a model: where every job naming it waits."""
    return f"{QUEUE_PREFIX}{model}"


def model_of_queue(queue: str) -> str | None:
    """The model a queue (or one of its priority sub-queues) belongs to; None if not blipq's."""
    if not queue.startswith(QUEUE_PREFIX):
        return None
    return queue[len(QUEUE_PREFIX) :].split(KOMBU_PRIORITY_SEP, 1)[0] or None


# --- bulk runs (producer/bulk/) ----------------------------------------------------------------
# Every key of a run expires BULK_RUN_EXPIRES_S after the run's last activity (refreshed with each
# heartbeat and each batch of finished items), like the results it points at.

BULK_RUN_KEY = "blipq:bulk:{run_id}"
"""Hash: a bulk run's metadata (kind, source, options, total, state, runner, timestamps) and its
``done`` / ``failed`` counters."""

BULK_JOBS_KEY = "blipq:bulk:{run_id}:jobs"
"""Hash: item (the image URI, or a manifest row's ``id``) -> job id, for every submitted item."""

BULK_DONE_KEY = "blipq:bulk:{run_id}:done"
"""Hash: item -> ``ok`` | ``error`` for every finished item whose result was handed out."""

BULK_LOCK_KEY = "blipq:bulk:{run_id}:lock"
"""String: the runner (``host:pid:token``) now driving the run; a lease of BULK_LOCK_TTL_S seconds
renewed by its heartbeat, so a second runner of the same run is refused."""

BULK_RUNS_KEY = "blipq:bulk:runs"
"""Sorted set: run ids by last activity (Unix time), for ``blipq status`` without a run id;
entries whose run has expired are dropped when it is read."""

BULK_RUN_EXPIRES_S = RESULT_EXPIRES_S
"""Seconds a run's keys outlive its last activity: the client's ``result_expires_s`` (this by
default), since a resumed run replays stored results that expire as fast."""

BULK_LOCK_TTL_S = 15
"""Seconds a dead runner's lease keeps others off its run (``--force`` takes it over at once)."""
