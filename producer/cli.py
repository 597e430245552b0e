"""``blipq``: submit jobs, read results, run the demo."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from producer import bulk, calibrate
from producer.client import Client
from producer.config import ClientSettings
from producer.errors import ResultTimeout
from producer.jobs import CaptionJob, JobResult, ModerationJob


def _client(args: argparse.Namespace) -> Client:
    return Client(redis_url=args.redis_url, settings=ClientSettings())


def _print_result(result: JobResult) -> None:
    print(json.dumps(result.model_dump(mode="json"), indent=2))


def cmd_caption(args: argparse.Namespace) -> int:
    try:
        job = CaptionJob(
            image=args.image,
            model=args.model,
            prompt=args.prompt,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.min_new_tokens,
            num_beams=args.num_beams,
        )
    except ValidationError as exc:
        print(f"invalid job: {exc}", file=sys.stderr)
        return 2
    with _client(args) as client:
        job_id = client.submit(job)
        if not args.wait:
            print(job_id)
            return 0
        return _wait_and_print(client, job_id, args.timeout)


def cmd_moderate(args: argparse.Namespace) -> int:
    try:
        job = ModerationJob(image=args.image, model=args.model, policy=args.policy)
    except ValidationError as exc:
        print(f"invalid job: {exc}", file=sys.stderr)
        return 2
    with _client(args) as client:
        job_id = client.submit(job)
        if not args.wait:
            print(job_id)
            return 0
        return _wait_and_print(client, job_id, args.timeout)


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
    print(f"{'queue':<20} {'waiting':>8}")
    for queue, depth in depths.items():
        print(f"{queue:<20} {depth:>8}")
    if not active:
        print("\nno worker answered")
    for worker, (reserved, running) in sorted(active.items()):
        print(f"\n{worker}: {running} active, {reserved} reserved")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from producer.demo import run_demo

    return run_demo(model=args.model, count=args.count)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blipq",
        description="blipq: BLIP / BLIP-2 jobs on Celery workers. Connection settings come from "
        "BLIPQ_REDIS_URL (and BLIPQ_BROKER_URL) unless --redis-url is given.",
    )
    parser.add_argument("--redis-url", help="Redis URL for broker and results (BLIPQ_REDIS_URL)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cap = sub.add_parser(
        "caption", help="caption an image in S3", description="Submit a caption job."
    )
    cap.add_argument("image", help="s3://bucket/key of the image")
    cap.add_argument("--prompt", help='conditional caption prefix, e.g. "a photography of"')
    cap.add_argument("--model", default="caption-base", help="model name from the worker's map")
    cap.add_argument("--max-new-tokens", type=int, default=30)
    cap.add_argument("--min-new-tokens", type=int, default=0)
    cap.add_argument("--num-beams", type=int, default=1)
    cap.add_argument("--wait", action="store_true", help="wait for the result and print it")
    cap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (with --wait)")
    cap.set_defaults(func=cmd_caption)

    mod = sub.add_parser(
        "moderate",
        help="moderate an image in S3 against a policy",
        description="Submit a moderation job: per-category scores, flags and a decision.",
    )
    mod.add_argument("image", help="s3://bucket/key of the image")
    mod.add_argument("--policy", default="default", help="policy name the worker serves")
    mod.add_argument("--model", default="itm-base", help="ITM model the policy is written for")
    mod.add_argument("--wait", action="store_true", help="wait for the result and print it")
    mod.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (with --wait)")
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
        help="run everything locally, offline: Redis, S3, a worker, caption jobs",
        description="Start a private Redis and S3 server, upload sample images, start a real "
        "worker, caption the images, print the results, and shut everything down.",
    )
    demo.add_argument(
        "--model",
        help="hub id or local dir of a BLIP captioning model "
        "(default: the shipped shapes-world fixture model)",
    )
    demo.add_argument("--count", type=int, default=24, help="number of caption jobs")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
