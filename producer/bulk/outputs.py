"""Output files of a run: JSON lines, CSV or Parquet, resumable (items written are skipped)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from producer.bulk.errors import BulkError
from producer.bulk.run import BulkResult
from producer.protocol.jobs import (
    CaptionOutput,
    JobResult,
    MatchOutput,
    ModerationOutput,
    VqaOutput,
)

FLAT_COLUMNS = (
    "item",
    "image",
    "job_id",
    "kind",
    "status",
    "text",
    "error_code",
    "error_message",
    "model",
    "total_ms",
    "queue_wait_ms",
    "batch_size",
    "worker",
    "output",
)


def result_text(result: JobResult) -> str:
    """The headline of a result: caption, answer, best-matching text or moderation decision."""
    output = result.output
    if isinstance(output, CaptionOutput):
        return output.caption
    if isinstance(output, VqaOutput):
        return output.answer
    if isinstance(output, MatchOutput):
        return output.best().text if output.scores else ""
    if isinstance(output, ModerationOutput):
        return output.decision
    return ""


def record(item: BulkResult) -> dict[str, Any]:
    """The JSON line of a result: ``item``, ``image`` and the JobResult's fields."""
    return {"item": item.key, "image": item.image, **item.result.model_dump(mode="json")}


def flat_row(item: BulkResult) -> dict[str, Any]:
    """One CSV / Parquet row; ``output`` is the full output as JSON, text fields on one line."""
    result = item.result
    output = result.output.model_dump(mode="json") if result.output else None
    return {
        "item": item.key,
        "image": item.image,
        "job_id": result.job_id,
        "kind": result.kind,
        "status": result.status,
        "text": _one_line(result_text(result)),
        "error_code": result.error.code.value if result.error else "",
        "error_message": _one_line(result.error.message) if result.error else "",
        "model": result.model or "",
        "total_ms": result.timings.total_ms,
        "queue_wait_ms": result.timings.queue_wait_ms,
        "batch_size": result.batch_size,
        "worker": result.worker or "",
        "output": json.dumps(output, ensure_ascii=False) if output is not None else "",
    }


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


class ResultWriter(Protocol):
    path: Path

    def written(self) -> dict[str, str]:
        """Items already in the output -> their status (a torn last record is cut off first)."""
        ...

    def write(self, item: BulkResult) -> None: ...

    def close(self, *, complete: bool) -> None: ...


def _complete_lines(path: Path) -> str:
    """The file's text up to its last newline; a torn last line (killed mid-write) is cut off."""
    if not path.exists():
        return ""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as handle:
            handle.truncate(end)
    return data[:end].decode("utf-8")


def _jsonl_written(path: Path) -> dict[str, str]:
    rows = (json.loads(line) for line in _complete_lines(path).splitlines() if line.strip())
    return {str(row["item"]): str(row["status"]) for row in rows}


class JsonlWriter:
    """JSON lines (``record`` by default), appended and flushed as results arrive."""

    def __init__(self, path: Path, encode: Callable[[BulkResult], dict[str, Any]] = record) -> None:
        self.path = path
        self._encode = encode
        self._handle: io.TextIOWrapper | None = None

    def written(self) -> dict[str, str]:
        return _jsonl_written(self.path)

    def write(self, item: BulkResult) -> None:
        if self._handle is None:
            self._handle = self.path.open("a", encoding="utf-8")
        self._handle.write(json.dumps(self._encode(item), ensure_ascii=False) + "\n")
        self._handle.flush()

    def close(self, *, complete: bool) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class CsvWriter:
    """CSV with a header (FLAT_COLUMNS), one line per result, appended and flushed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: io.TextIOWrapper | None = None
        self._writer: Any = None

    def written(self) -> dict[str, str]:
        rows = csv.DictReader(io.StringIO(_complete_lines(self.path)))
        return {row["item"]: row["status"] for row in rows if row.get("item")}

    def write(self, item: BulkResult) -> None:
        if self._writer is None:
            fresh = not self.path.exists() or self.path.stat().st_size == 0
            self._handle = self.path.open("a", encoding="utf-8", newline="")
            self._writer = csv.DictWriter(self._handle, FLAT_COLUMNS, lineterminator="\n")
            if fresh:
                self._writer.writeheader()
        self._writer.writerow(flat_row(item))
        assert self._handle is not None
        self._handle.flush()

    def close(self, *, complete: bool) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = self._writer = None


class ParquetWriter:
    """Parquet needs the whole file at once: rows go to a JSON-lines journal beside it
    (``<out>.partial.jsonl``) as they arrive, and become the Parquet file (merged with an
    existing one) when the run completes."""

    def __init__(self, path: Path) -> None:
        try:
            import pyarrow  # type: ignore[import-untyped]  # noqa: F401
        except ImportError as exc:
            raise BulkError(
                "Parquet output needs pyarrow: pip install 'blipq[parquet]'; or use .jsonl / .csv"
            ) from exc
        self.path = path
        self.journal = path.with_name(path.name + ".partial.jsonl")
        self._rows = JsonlWriter(self.journal, encode=flat_row)

    def _existing(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        import pyarrow.parquet as pq  # type: ignore[import-untyped]

        rows: list[dict[str, Any]] = pq.read_table(self.path).to_pylist()
        return rows

    def written(self) -> dict[str, str]:
        keys = {str(row["item"]): str(row["status"]) for row in self._existing()}
        return {**keys, **_jsonl_written(self.journal)}

    def write(self, item: BulkResult) -> None:
        self._rows.write(item)

    def close(self, *, complete: bool) -> None:
        self._rows.close(complete=complete)
        if not complete or not self.journal.exists():
            return
        import pyarrow as pa  # type: ignore[import-untyped]
        import pyarrow.parquet as pq  # type: ignore[import-untyped]

        rows = self._existing()
        rows += [json.loads(line) for line in _complete_lines(self.journal).splitlines() if line]
        tmp = self.path.with_name(self.path.name + ".tmp")
        pq.write_table(pa.Table.from_pylist(rows, schema=_parquet_schema()), tmp)
        tmp.replace(self.path)
        self.journal.unlink()


def _parquet_schema() -> Any:
    import pyarrow as pa  # type: ignore[import-untyped]

    types = {"total_ms": pa.float64(), "queue_wait_ms": pa.float64(), "batch_size": pa.int64()}
    return pa.schema([(name, types.get(name, pa.string())) for name in FLAT_COLUMNS])


def open_writer(path: str | Path) -> ResultWriter:
    """A writer for ``.jsonl`` / ``.ndjson`` (JSON lines), ``.csv`` or ``.parquet``."""
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix in {".jsonl", ".ndjson"}:
        return JsonlWriter(target)
    if suffix == ".csv":
        return CsvWriter(target)
    if suffix == ".parquet":
        return ParquetWriter(target)
    raise BulkError(f"--out {path}: use a .jsonl, .csv or .parquet file")
