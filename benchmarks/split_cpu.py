"""CPU per image of a split worker's processes, for one or more source trees in one run (A/B).

    python -m benchmarks.split_cpu --trees /tmp/before,. --jobs 1000 --reps 3 --per-message 1,16

Each tree (a checkout of blipq, e.g. ``git worktree add /tmp/before HEAD~1``) starts its own
``blipq-worker`` with the null model (every step but inference) and ``--intake-processes``
intake processes (0: one worker process, whose model thread counts as the model process and
the whole process as the intake), serving a model name of its own, against one Redis and one
S3 server. The rounds rotate over trees and message sizes; each prints images/s and the CPU ms
per image (utime + stime from ``/proc``) of the model process and of each intake process, and
the batch sizes. The table at the end has the medians. CPU time per image moves far less than
images/s on a shared machine, which is why the A/B is on it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks import fixtures
from benchmarks.modes import Blipq
from benchmarks.processes import ProcessCpu, ms_per_image
from benchmarks.throughput import Servers, _blipq_env, _pid, _upload, parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trees", required=True, help="comma-separated blipq checkouts")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--per-message", default="1,16", help="jobs per message, e.g. 1,16")
    parser.add_argument("--intake-processes", type=int, default=1)
    args = parser.parse_args(argv)
    from producer import Client
    from producer.cli.embedded import EmbeddedRedis, EmbeddedS3, WorkerProcess

    trees = [str(Path(t).resolve()) for t in args.trees.split(",")]
    sizes = [int(n) for n in args.per_message.split(",")]
    opts = parse(["--null-model"])
    paths = fixtures.photos(opts.images)
    redis_server, s3_server = EmbeddedRedis().start(), EmbeddedS3().start()
    model_ms: dict[tuple[str, int], list[float]] = {}
    intake_ms: dict[tuple[str, int], list[float]] = {}
    rates: dict[tuple[str, int], list[float]] = {}
    workers = []
    try:
        servers = Servers(redis_server, s3_server, _upload(s3_server, paths))
        todo = [servers.keys[i % len(servers.keys)] for i in range(args.jobs)]
        for index, tree in enumerate(trees):
            env = _blipq_env(opts, servers, f"null{index}", {"source": "null", "family": "null"})
            env.update(BLIPQ_INTAKE_PROCESSES=str(args.intake_processes), PYTHONPATH=tree)
            workers.append(WorkerProcess(env, cwd=Path(tree)).start())
        with Client(redis_url=redis_server.url) as client:
            for rep in range(args.reps):
                for index, (tree, worker) in enumerate(zip(trees, workers, strict=True)):
                    for size in sizes:
                        mode = Blipq(
                            "b", client, f"null{index}", 8, warm_burst=50, per_message=size
                        )
                        mode.keys = servers.keys
                        mode.warm()
                        cpu = ProcessCpu(_pid(worker))
                        before = cpu.snapshot()
                        started = time.perf_counter()
                        images = mode.run(todo)
                        rate = images / (time.perf_counter() - started)
                        ms = ms_per_image(before, cpu.snapshot(), images)
                        # With --intake-processes 0 the one worker process is both.
                        model = ms.get("model_process", ms.get("model_thread", 0.0))
                        model_ms.setdefault((tree, size), []).append(model)
                        intakes = sum(
                            v for role, v in ms.items() if role.startswith(("intake_", "worker"))
                        )
                        intake_ms.setdefault((tree, size), []).append(intakes)
                        rates.setdefault((tree, size), []).append(rate)
                        batches = dict(sorted(mode.batch_sizes.items()))
                        print(f"rep {rep} {tree} {size}/msg: {rate:.1f}/s {ms} batches {batches}")
    finally:
        for worker in workers:
            worker.stop()
        s3_server.close()
        redis_server.close()
    print(
        "\n| tree | jobs per message | images/s (median) | model process CPU ms/image "
        "| intake processes CPU ms/image (median) |"
    )
    print("|---|---:|---:|---|---:|")
    for (tree, size), values in model_ms.items():
        rate = statistics.median(rates[tree, size])
        shown = " / ".join(f"{v:.2f}" for v in values)
        print(
            f"| {tree} | {size} | {rate:.1f} | {shown} (median {statistics.median(values):.2f}) "
            f"| {statistics.median(intake_ms[tree, size]):.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
