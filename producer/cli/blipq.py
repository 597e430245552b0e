"""``blipq``: submit jobs, read results, run the demo."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import redis
from pydantic import ValidationError

from producer.cli import bulk, calibrate
from producer.client import Client
from producer.protocol.errors import RedisUnavailable, ResultTimeout
from producer.protocol.jobs import (
    AnyJob,
    CaptionJob,
    JobResult,
    MatchJob,
    ModerationJob,
    VqaJob,
    describe_validation,
)
from producer.protocol.settings import ClientSettings


def _client(args: argparse.Namespace) -> Client:
    return Client(redis_url=args.redis_url, settings=ClientSettings())


def _print_result(result: JobResult) -> None:
    print(json.dumps(result.model_dump(mode="json"), indent=2))


def _submit(args: argparse.Namespace, build: Callable[[], AnyJob]) -> int:
    """Validate the job first (exit 2 on a bad one), send it, and maybe wait for its result."""
    try:
        job = build()
    except ValidationError as exc:
        print(f"invalid job: {describe_validation(exc)}", file=sys.stderr)
        return 2
    with _client(args) as client:
        job_id = client.submit(job)
        if not args.wait:
            print(job_id)
            return 0
        return _wait_and_print(client, job_id, args.timeout)


def cmd_caption(args: argparse.Namespace) -> int:
    return _submit(
        args,
        lambda: CaptionJob(
            image=args.image,
            model=args.model,
            prompt=args.prompt,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.min_new_tokens,
            num_beams=args.num_beams,
            candidates=args.candidates,
        ),
    )


def cmd_vqa(args: argparse.Namespace) -> int:
    return _submit(
        args,
        lambda: VqaJob(
            image=args.image,
            question=args.question,
            model=args.model,
            max_new_tokens=args.max_new_tokens,
            num_beams=args.num_beams,
        ),
    )


def cmd_match(args: argparse.Namespace) -> int:
    return _submit(args, lambda: MatchJob(image=args.image, texts=args.text, model=args.model))


def cmd_moderate(args: argparse.Namespace) -> int:
    return _submit(
        args, lambda: ModerationJob(image=args.image, model=args.model, policy=args.policy)
    )


def cmd_result(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _wait_and_print(client, args.job_id, args.timeout)


def _wait_and_print(client: Client, job_id: str, timeout: float) -> int:
    try:
        result = client.result(job_id, timeout=timeout)
    except ResultTimeout:
        print(
            f"no result for {job_id} within {timeout}s (still queued or running?)", file=sys.stderr
        )
        return 3
    _print_result(result)
    return 0 if result.ok else 1


def cmd_queues(args: argparse.Namespace) -> int:
    with _client(args) as client:
        depths = client.queue_depths()
        active = client.worker_activity(timeout=args.timeout)
        consumers = client.queue_consumers(timeout=args.timeout)
    # One queue per model; a queue no live worker consumes holds jobs that wait for one.
    width = max([24, *(len(queue) + 1 for queue in depths)])
    print(f"{'queue':<{width}} {'waiting':>8} {'workers':>8}")
    for queue, depth in depths.items():
        served = consumers.get(queue, 0)
        note = "" if served else "  (no live worker serves this model)"
        print(f"{queue:<{width}} {depth:>8} {served:>8}{note}")
    if not active:
        print("\nno worker answered")
    for worker, (reserved, running) in sorted(active.items()):
        print(f"\n{worker}: {running} active, {reserved} reserved")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from producer.cli.demo import run_demo

    return run_demo(model=args.model, count=args.count)


def _job_parser(sub: Any, name: str, help_text: str, model: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("image", help="s3://bucket/key of the image")
    parser.add_argument("--model", default=model, help="model name from the worker's map")
    parser.add_argument("--wait", action="store_true", help="wait for the result and print it")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (--wait)")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("blipq")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blipq",
        description="blipq: BLIP / BLIP-2 jobs on Celery workers. Connection settings come from "
        "BLIPQ_REDIS_URL (and BLIPQ_BROKER_URL) unless --redis-url is given.",
    )
    parser.add_argument("--redis-url", help="Redis URL for broker and results (BLIPQ_REDIS_URL)")
    parser.add_argument("--version", action="version", version=f"blipq {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cap = _job_parser(sub, "caption", "caption an image in S3", "caption-base")
    cap.add_argument("--prompt", help='conditional caption prefix, e.g. "a photography of"')
    cap.add_argument("--max-new-tokens", type=int, default=30)
    cap.add_argument("--min-new-tokens", type=int, default=0)
    cap.add_argument("--num-beams", type=int, default=1)
    cap.add_argument("--candidates", type=int, default=0, help="best-of-k: k nucleus samples")
    cap.set_defaults(func=cmd_caption)

    vqa = _job_parser(sub, "vqa", "ask a question about an image in S3", "vqa-base")
    vqa.add_argument("--question", required=True, help='e.g. "how many dogs are there?"')
    vqa.add_argument("--max-new-tokens", type=int, default=10)
    vqa.add_argument("--num-beams", type=int, default=1)
    vqa.set_defaults(func=cmd_vqa)

    match = _job_parser(sub, "match", "score texts against an image in S3 (ITM, ITC)", "itm-base")
    match.add_argument("--text", action="append", required=True, help="a text (repeatable)")
    match.set_defaults(func=cmd_match)

    mod = _job_parser(sub, "moderate", "moderate an image in S3 against a policy", "itm-base")
    mod.add_argument("--policy", default="default", help="policy name the worker serves")
    mod.set_defaults(func=cmd_moderate)
    calibrate.add_command(sub, _client)
    bulk.add_commands(sub, _client)

    res = sub.add_parser(
        "result", help="print the result of a job", description="Wait for a result."
    )
    res.add_argument("job_id")
    res.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for it")
    res.set_defaults(func=cmd_result)

    queues = sub.add_parser(
        "queues",
        help="queue depths and worker activity",
        description="Show queue depths "
        "(priority sub-queues summed) and each worker's active and reserved jobs.",
    )
    queues.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for workers")
    queues.set_defaults(func=cmd_queues)

    demo = sub.add_parser(
        "demo",
        help="run everything locally, offline: Redis, S3, a worker, caption (and VQA) jobs",
        description="Start a private Redis and S3 server, upload sample images, start a real "
        "worker, caption the images, print the results, and shut everything down.",
    )
    demo.add_argument(
        "--model",
        help="hub id or local dir of a BLIP captioning or BLIP-2 model, or the name of a "
        "fixture model of the checkout (shapes-blip2-opt, shapes-blip2-t5: captions and VQA, "
        "each marked right or wrong); default: the shipped shapes-world captioning model",
    )
    demo.add_argument("--count", type=int, default=24, help="number of caption jobs")
    demo.set_defaults(func=cmd_demo)
    return parser


EXIT_REDIS_UNAVAILABLE = 5
"""Exit code of any command that could not reach Redis (1 means a job failed)."""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except RedisUnavailable as exc:
        print(f"blipq: {exc}", file=sys.stderr)
        return EXIT_REDIS_UNAVAILABLE
    except redis.ConnectionError as exc:
        url = args.redis_url or ClientSettings().redis_url
        print(f"blipq: {RedisUnavailable(url, str(exc))}", file=sys.stderr)
        return EXIT_REDIS_UNAVAILABLE
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
