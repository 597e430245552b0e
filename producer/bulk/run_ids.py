"""Run ids and job ids: stable for the same inputs, the same in every start of a run."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from producer.bulk.errors import BulkError
from producer.bulk.inputs import BulkItem
from producer.protocol.jobs import encode_job

_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")
# Namespace of the job ids of bulk runs: uuid5(namespace, run id + NUL + item).
_JOB_ID_NAMESPACE = uuid.UUID("6f1d3c2e-8f0b-4b8e-9a43-0c1b5e7d2a91")


def digest(value: object) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def derive_run_id(kind: str, source: str, options: Mapping[str, Any] | None = None) -> str:
    """A stable run id for the same inputs: ``<kind>-<12 hex digits>``.

    ``source`` names the inputs (an ``s3://`` prefix, or a digest of a manifest's or a list's
    content); ``options`` are the job fields given for every item.
    """
    return f"{kind}-{digest([kind, source, dict(options or {})])[:12]}"


def content_digest(items: Sequence[BulkItem]) -> str:
    """A digest of items (keys and full jobs, in order), as a run source."""
    return "items:" + digest([[item.key, encode_job(item.job)] for item in items])[:32]


def check_run_id(run_id: str) -> str:
    if not _RUN_ID_RE.match(run_id):
        raise BulkError(
            f"run id {run_id!r:.120}: 1-100 characters of letters, digits and . _ : - "
            "(starting with a letter or digit)"
        )
    return run_id


def job_id_for(run_id: str, key: str) -> str:
    """The job id of an item: the same in every start of the run."""
    return str(uuid.uuid5(_JOB_ID_NAMESPACE, f"{run_id}\0{key}"))
