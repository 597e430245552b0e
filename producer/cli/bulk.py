"""CLI: ``blipq bulk KIND ...`` and ``blipq status [RUN_ID]``."""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from producer.bulk.cancel import cancel_run
from producer.bulk.errors import BulkError, BulkStalled
from producer.bulk.inputs import BulkItem, items_from, manifest_format, read_manifest
from producer.bulk.outputs import ResultWriter, open_writer
from producer.bulk.progress import ProgressLine, format_duration, render_progress
from producer.bulk.run import BulkRun, run_items
from producer.bulk.s3 import list_prefix, make_s3_client
from producer.bulk.state import RunStatus, list_runs, read_status
from producer.protocol.jobs import JOB_KINDS, describe_validation

if TYPE_CHECKING:
    from producer.client import Client


ClientFactory = Callable[[argparse.Namespace], "Client"]

# Per kind: (flag, job field, argparse keywords). Unset flags leave the job's default (or the
# manifest row's value); a manifest row's fields override the flags.
_KIND_FLAGS: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "caption": [
        ("--prompt", "prompt", {"help": 'conditional caption prefix, e.g. "a photography of"'}),
        ("--max-new-tokens", "max_new_tokens", {"type": int}),
        ("--min-new-tokens", "min_new_tokens", {"type": int}),
        ("--num-beams", "num_beams", {"type": int}),
        ("--candidates", "candidates", {"type": int, "help": "best-of-k captions (CapFilt)"}),
        ("--scorer", "scorer", {"help": "ITM model ranking the candidates"}),
    ],
    "vqa": [
        ("--question", "question", {"help": "the question for every image"}),
        ("--max-new-tokens", "max_new_tokens", {"type": int}),
        ("--num-beams", "num_beams", {"type": int}),
    ],
    "match": [
        ("--text", "texts", {"action": "append", "help": "a text to score (repeat the flag)"}),
    ],
    "moderate": [
        ("--policy", "policy", {"help": "policy name the worker serves"}),
    ],
}
_KIND_HELP = {
    "caption": "caption every image",
    "vqa": "ask every image a question",
    "match": "score texts against every image",
    "moderate": "moderate every image against a policy",
}


def add_commands(sub: Any, make_client: ClientFactory) -> None:
    """Register ``bulk`` and ``status`` on the ``blipq`` parser."""
    bulk = sub.add_parser(
        "bulk",
        help="run jobs over an S3 prefix or a manifest, resumably",
        description="Submit one job per image under an S3 prefix (or per manifest row) in chunks, "
        "write results as they arrive (.jsonl, .csv, or .parquet with pyarrow), show progress on "
        "stderr. Run the same command again to resume: what is done is skipped. Exit codes: 0 "
        "complete, 1 complete with failed items, 2 bad input, 3 stalled, 4 stopped early.",
    )
    kinds = bulk.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind in JOB_KINDS:
        parser = kinds.add_parser(kind, help=_KIND_HELP[kind], description=_KIND_HELP[kind])
        _add_run_flags(parser)
        for flag, field, keywords in _KIND_FLAGS[kind]:
            metavar = flag.removeprefix("--").replace("-", "_").upper()
            parser.add_argument(
                flag, dest=f"job_{field}", default=None, metavar=metavar, **keywords
            )
        parser.set_defaults(func=lambda args: cmd_bulk(args, make_client))
    cancel = kinds.add_parser(
        "cancel",
        help="take a stopped run's queued jobs back",
        description="Remove a stopped run's still-queued jobs from the broker (Redis) and the "
        "job ledger, and mark their items cancelled; jobs a worker has taken finish normally. "
        "Run the same `blipq bulk` command again to resume: it sends the cancelled items again.",
    )
    cancel.add_argument("run_id", help="the run id `blipq bulk` printed")
    cancel.add_argument(
        "--force", action="store_true", help="cancel even while a runner holds the run"
    )
    cancel.set_defaults(func=lambda args: cmd_cancel(args, make_client))

    status = sub.add_parser(
        "status",
        help="progress of a bulk run (from any machine)",
        description="Show a bulk run's progress from Redis; without RUN_ID, list recent runs.",
    )
    status.add_argument("run_id", nargs="?", help="the run id `blipq bulk` printed")
    status.add_argument("--json", action="store_true", help="print the run as JSON")
    status.set_defaults(func=lambda args: cmd_status(args, make_client))


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prefix", nargs="?", help="s3://bucket/prefix/ to list (or --manifest)")
    parser.add_argument("--manifest", help=".jsonl or .csv: an image column plus job fields")
    parser.add_argument("--out", required=True, help="results file: .jsonl, .csv or .parquet")
    parser.add_argument("--run-id", help="name of the run (default: derived from the inputs)")
    parser.add_argument(
        "--model", dest="job_model", default=None, metavar="MODEL", help="model for every job"
    )
    parser.add_argument(
        "--suffix", action="append", default=[], help="only keys ending so (e.g. .jpg; repeat)"
    )
    parser.add_argument("--max-pending", type=int, default=2000, help="jobs in flight at most")
    parser.add_argument("--chunk", type=int, default=None, help="jobs per Redis round trip")
    parser.add_argument(
        "--per-message",
        type=int,
        default=None,
        metavar="N",
        help="jobs per broker message (chunk messages; default BLIPQ_JOBS_PER_MESSAGE, 1)",
    )
    parser.add_argument(
        "--idle-timeout", type=float, default=600.0, help="give up after this long with no result"
    )
    parser.add_argument(
        "--force", action="store_true", help="take the run over from a runner that died"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _job_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        name.removeprefix("job_"): value
        for name, value in vars(args).items()
        if name.startswith("job_") and value is not None
    }


def _inputs(args: argparse.Namespace, options: Mapping[str, Any]) -> tuple[list[BulkItem], str]:
    """The run's items and its source name, from --manifest or an S3 prefix."""
    if bool(args.manifest) == bool(args.prefix):
        raise BulkError("give an s3://bucket/prefix/ or --manifest FILE (one of them)")
    if args.manifest:
        path = Path(args.manifest)
        data = path.read_bytes()
        items = read_manifest(
            data.decode("utf-8"),
            fmt=manifest_format(path),
            kind=args.kind,
            defaults=options,
            source=str(path),
        )
        return items, f"manifest:{hashlib.sha256(data).hexdigest()[:32]}"
    uris = list_prefix(make_s3_client(), args.prefix, args.suffix)
    if not uris:
        raise BulkError(f"no objects under {args.prefix}")
    try:
        items = items_from(uris, kind=args.kind, options=options)
    except ValidationError as exc:
        raise BulkError(f"invalid job: {describe_validation(exc, strip_kind=True)}") from exc
    suffixes = f" suffix={','.join(args.suffix)}" if args.suffix else ""
    return items, f"{args.prefix}{suffixes}"


def cmd_bulk(args: argparse.Namespace, make_client: ClientFactory) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    options = _job_options(args)
    try:
        writer = open_writer(args.out)
        items, source = _inputs(args, options)
        handled = writer.written()
    except (BulkError, OSError, ValueError, BotoCoreError, ClientError) as exc:
        print(f"blipq bulk: {exc}{s3_hint(exc)}", file=sys.stderr)
        return 2
    with make_client(args) as client:
        try:
            run = run_items(
                client.sender,
                items,
                run_id=args.run_id,
                kind=args.kind,
                options=options,
                handled=handled,
                source=source,
                max_pending=args.max_pending,
                chunk=args.chunk,
                per_message=args.per_message,
                idle_timeout_s=args.idle_timeout,
                force=args.force,
                inputs_file=str(Path(args.manifest).resolve()) if args.manifest else None,
            )
        except BulkError as exc:
            print(f"blipq bulk: {exc}", file=sys.stderr)
            return 2
        return drive(run, writer, out=sys.stderr, quiet=args.quiet)


def cmd_cancel(args: argparse.Namespace, make_client: ClientFactory) -> int:
    with make_client(args) as client:
        try:
            done = cancel_run(client.sender, args.run_id, force=args.force)
        except BulkError as exc:
            print(f"blipq bulk cancel: {exc}", file=sys.stderr)
            return 2
    print(f"run {done.run_id}: cancelled {done.removed} queued jobs")
    if done.in_flight:
        print(f"{done.in_flight} jobs were not queued (taken by a worker): they finish normally")
    if done.removed:
        print("run the same `blipq bulk` command again to resume: it sends them again")
    return 0


_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"}


def s3_hint(exc: Exception) -> str:
    """What to set when listing S3 failed for want of credentials or an endpoint."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None
    if isinstance(exc, NoCredentialsError | PartialCredentialsError) or code in _CREDENTIAL_CODES:
        return (
            " (set BLIPQ_S3_ACCESS_KEY_ID and BLIPQ_S3_SECRET_ACCESS_KEY, and "
            "BLIPQ_S3_ENDPOINT_URL for a store other than AWS)"
        )
    if isinstance(exc, EndpointConnectionError):
        return " (check BLIPQ_S3_ENDPOINT_URL)"
    return ""


def drive(run: BulkRun, writer: ResultWriter, *, out: Any, quiet: bool = False) -> int:
    """Run to the end (or a stop signal), writing each result; return the exit code."""
    line = ProgressLine(out, quiet=quiet)
    resumed = f", resumed: {run.skipped} already written" if run.resumed else ""
    print(f"run {run.run_id}: {run.total} items -> {writer.path}{resumed}", file=out)
    if run.resubmitted:
        print(f"{run.resubmitted} finished items lost their stored results: resubmitted", file=out)
    stalled: BulkStalled | None = None
    with _StopOnSignals(run):
        try:
            for item in run:
                writer.write(item)
                line.update(run.progress())
        except BulkStalled as exc:
            stalled = exc
        finally:
            writer.close(complete=run.complete)
    progress = run.progress()
    line.end(progress)
    if stalled is not None:
        print(f"stalled: {stalled}", file=out)
        return 3
    if not run.complete:
        print(
            f"stopped with {progress.done}/{progress.total} done; run the same command again "
            f"(run id {run.run_id}) to resume",
            file=out,
        )
        return 4
    print(f"complete: {progress.ok} ok, {progress.failed} failed -> {writer.path}", file=out)
    return 1 if progress.failed else 0


class _StopOnSignals:
    """SIGTERM and the first SIGINT stop the run gracefully (a second SIGINT interrupts)."""

    def __init__(self, run: BulkRun) -> None:
        self._run = run
        self._saved: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self._run._stop.is_set():
            raise KeyboardInterrupt
        self._run.stop()

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._saved[signum] = signal.signal(signum, self._handle)

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)


def run_status(client: Client, run_id: str) -> RunStatus | None:
    """A run's status as Redis has it (any machine)."""
    return read_status(client.sender.redis, run_id)


def describe_status(status: RunStatus, now: float | None = None) -> str:
    """The text ``blipq status RUN_ID`` prints."""
    now = now or time.time()
    meta = status.meta
    age = now - float(meta.get("updated_at") or now)
    if status.state == "running" and status.runner is None:
        state = f"running? no runner holds the run (last update {format_duration(age)} ago)"
    elif status.state == "running":
        state = f"running on {status.runner} (updated {age:.0f}s ago)"
    else:
        state = f"{status.state} (last update {format_duration(age)} ago)"
    created = time.strftime(
        "%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(meta.get("created_at") or 0))
    )
    manifest = [f"manifest  {meta['inputs_file']}"] if meta.get("inputs_file") else []
    cancelled = (
        [f"cancelled {status.cancelled} queued jobs removed; start the run again to resume"]
        if status.cancelled
        else []
    )
    return "\n".join(
        [
            f"run       {status.run_id}",
            f"inputs    {meta.get('description', '?')}",
            *manifest,
            f"state     {state}",
            f"progress  {render_progress(status.progress(now))}",
            *cancelled,
            f"created   {created}",
        ]
    )


def cmd_status(args: argparse.Namespace, make_client: ClientFactory) -> int:
    with make_client(args) as client:
        if args.run_id is None:
            runs = list_runs(client.sender.redis)
            if not runs:
                print("no bulk runs in Redis")
            for status in runs:
                progress = status.progress()
                print(
                    f"{status.run_id:<32} {status.state:<9} "
                    f"{progress.done}/{progress.total} done, {progress.failed} failed"
                )
            return 0
        found = run_status(client, args.run_id)
    if found is None:
        print(f"no run {args.run_id} in Redis (never started, or expired)", file=sys.stderr)
        return 1
    status = found
    if args.json:
        progress = status.progress()
        payload = {
            "run_id": status.run_id,
            "state": status.state,
            "runner": status.runner,
            "meta": status.meta,
            "progress": {
                "total": progress.total,
                "submitted": progress.submitted,
                "done": progress.done,
                "failed": progress.failed,
                "cancelled": status.cancelled,
                "rate": progress.rate,
                "eta_s": progress.eta_s,
            },
        }
        print(json.dumps(payload, indent=2))
    else:
        print(describe_status(status))
    return 0
