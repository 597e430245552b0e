"""Bulk inputs: items from jobs, image URIs or a JSONL / CSV manifest (pure parsing)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from producer.bulk.errors import BulkError
from producer.protocol.jobs import JOB_KINDS, AnyJob, Job, describe_validation

_JOB_ADAPTER: TypeAdapter[AnyJob] = TypeAdapter(Job)


@dataclass(frozen=True, slots=True)
class BulkItem:
    """One unit of a run: ``key`` names it in the run's state and output (unique in a run)."""

    key: str
    job: AnyJob


def build_job(kind: str, fields: Mapping[str, Any]) -> AnyJob:
    """A job of ``kind`` from fields (``image`` included); raise pydantic's ValidationError."""
    if kind not in JOB_KINDS:
        raise BulkError(f"unknown job kind {kind!r}; one of {', '.join(JOB_KINDS)}")
    return _JOB_ADAPTER.validate_python({**fields, "kind": kind})


def items_from(
    jobs: Iterable[AnyJob | str] | Mapping[str, AnyJob | str],
    *,
    kind: str = "caption",
    options: Mapping[str, Any] | None = None,
) -> list[BulkItem]:
    """Items from jobs or image URIs (made into ``kind`` jobs with ``options``).

    A sequence is keyed by image URI (an image may appear once); a mapping by its keys.
    """
    pairs: Iterable[tuple[str | None, AnyJob | str]] = (
        jobs.items() if isinstance(jobs, Mapping) else ((None, job) for job in jobs)
    )
    items: list[BulkItem] = []
    seen: set[str] = set()
    for key, entry in pairs:
        job = (
            build_job(kind, {**(options or {}), "image": entry})
            if isinstance(entry, str)
            else entry
        )
        name = job.image if key is None else key
        if name in seen:
            raise BulkError(f"item {name!r} appears twice; pass a mapping of unique keys to jobs")
        seen.add(name)
        items.append(BulkItem(name, job))
    return items


ManifestFormat = Literal["jsonl", "csv"]


def manifest_format(path: str | Path) -> ManifestFormat:
    """``csv`` for ``*.csv``, ``jsonl`` for ``*.jsonl`` / ``*.ndjson`` / ``*.json``."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in {".jsonl", ".ndjson", ".json"}:
        return "jsonl"
    raise BulkError(f"manifest {path}: use a .jsonl or .csv file")


def read_manifest(
    text: str,
    *,
    fmt: ManifestFormat,
    kind: str,
    defaults: Mapping[str, Any] | None = None,
    source: str = "manifest",
) -> list[BulkItem]:
    """Items from a manifest: an ``image`` column plus job fields, which override ``defaults``.

    An optional ``id`` column names items (needed when an image appears on several rows); without
    it the image URI is the item. In CSV, empty cells are absent and a cell starting with ``[``
    is a JSON list (``texts``); a single text is a list of one. Errors name the line.
    """
    rows = _jsonl_rows(text, source) if fmt == "jsonl" else _csv_rows(text, source)
    items: list[BulkItem] = []
    seen: dict[str, str] = {}
    for where, row in rows:
        if row.get("kind", kind) != kind:
            raise BulkError(f"{where}: kind {row['kind']!r} in a {kind} run")
        fields = {name: value for name, value in row.items() if name not in {"id", "kind"}}
        if not isinstance(fields.get("image"), str):
            raise BulkError(f'{where}: needs an "image" (s3://bucket/key)')
        try:
            job = build_job(kind, {**(defaults or {}), **fields})
        except ValidationError as exc:
            raise BulkError(f"{where}: {describe_validation(exc, strip_kind=True)}") from exc
        key = str(row["id"]) if row.get("id") not in (None, "") else job.image
        if key in seen:
            raise BulkError(
                f"{where}: item {key!r} is also on {seen[key]}; add an id column to tell rows apart"
            )
        seen[key] = where
        items.append(BulkItem(key, job))
    if not items:
        raise BulkError(f"{source}: no rows")
    return items


def _jsonl_rows(text: str, source: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{source}:{number}"
        try:
            row = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise BulkError(f"{where}: not JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise BulkError(f"{where}: expected a JSON object")
        yield where, row


def _csv_rows(text: str, source: str) -> Iterator[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "image" not in reader.fieldnames:
        raise BulkError(f"{source}: the header needs an image column")
    for row in reader:
        where = f"{source}:{reader.line_num}"
        if None in row:
            raise BulkError(f"{where}: more cells than header columns")
        fields: dict[str, Any] = {}
        for name, cell in row.items():
            value = (cell or "").strip()
            if not value:
                continue
            if name == "texts":
                fields[name] = _texts_cell(value, where)
            else:
                fields[name] = value
        yield where, fields


def _texts_cell(value: str, where: str) -> list[str]:
    if not value.startswith("["):
        return [value]
    try:
        texts = json.loads(value)
    except json.JSONDecodeError as exc:
        raise BulkError(f"{where}: texts is not a JSON list ({exc.msg})") from exc
    if not isinstance(texts, list):
        raise BulkError(f"{where}: texts must be a JSON list of strings")
    return texts
