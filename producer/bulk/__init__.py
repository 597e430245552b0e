"""Bulk runs: one job per image under an S3 prefix, in a manifest, or in a Python list.

A run has an id. Its state lives in Redis (keys in ``producer.protocol.keys``: metadata and
counters, item -> job id, finished items, a runner lease), so a second start of the same run
submits only what was never submitted and hands out only what was not handed out, and ``blipq
status RUN_ID`` shows its progress from any machine.

Job ids are derived from the run id and the item (UUID 5), so an item always has the same id: a
runner killed between sending a chunk and recording it finds, on resume, the results of what
already ran and resubmits only the rest. At most ``max_pending`` jobs are in flight at once, so a
large run does not flood a queue that other producers share.

Results are handed out at least once: an item counts as done when the next one is asked for, so a
consumer that dies while handling one gets it again. The CLI's output files make that exactly once:
on resume they are read back, and items already in them are skipped.

Producer side only: no torch, no worker code; the parsing and the progress math are pure.

Modules: ``inputs`` (items, manifests), ``s3`` (prefix listing), ``run_ids``, ``progress``,
``state`` (Redis), ``run`` (``BulkRun``, waiting with ``producer.client.waiting``), ``outputs``
(result files), ``cancel`` (a stopped run's queued jobs taken back). The public names are
re-exported here; the commands are ``producer.cli.bulk``.
"""

from __future__ import annotations

from producer.bulk.cancel import Cancelled, cancel_run
from producer.bulk.errors import BulkError, BulkStalled
from producer.bulk.inputs import (
    BulkItem,
    ManifestFormat,
    build_job,
    items_from,
    manifest_format,
    read_manifest,
)
from producer.bulk.outputs import (
    FLAT_COLUMNS,
    CsvWriter,
    JsonlWriter,
    ParquetWriter,
    ResultWriter,
    flat_row,
    open_writer,
    record,
    result_text,
)
from producer.bulk.progress import (
    Progress,
    ProgressLine,
    compute_progress,
    format_duration,
    render_progress,
)
from producer.bulk.run import BulkResult, BulkRun, run_items, start_run
from producer.bulk.run_ids import check_run_id, content_digest, derive_run_id, job_id_for
from producer.bulk.s3 import S3Settings, list_prefix, make_s3_client, split_prefix
from producer.bulk.state import RunState, RunStatus, list_runs, read_status

__all__ = [
    "FLAT_COLUMNS",
    "BulkError",
    "BulkItem",
    "BulkResult",
    "BulkRun",
    "BulkStalled",
    "Cancelled",
    "CsvWriter",
    "JsonlWriter",
    "ManifestFormat",
    "ParquetWriter",
    "Progress",
    "ProgressLine",
    "ResultWriter",
    "RunState",
    "RunStatus",
    "S3Settings",
    "build_job",
    "cancel_run",
    "check_run_id",
    "compute_progress",
    "content_digest",
    "derive_run_id",
    "flat_row",
    "format_duration",
    "items_from",
    "job_id_for",
    "list_prefix",
    "list_runs",
    "make_s3_client",
    "manifest_format",
    "open_writer",
    "read_manifest",
    "read_status",
    "record",
    "render_progress",
    "result_text",
    "run_items",
    "split_prefix",
    "start_run",
]
