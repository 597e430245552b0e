"""``python -m benchmarks.throughput``: blipq against the model alone and the obvious baselines.

One run, same model, same images, same machine:

- ``bare``          the model alone on pre-made pixel tensors, best of a few batch sizes (the limit)
- ``seed_loop``     the model card's way, per image: S3 get_object, PIL open, processor, generate
- ``celery_naive``  one Celery task per image doing the seed loop's work (solo pool, no batching)
- ``blipq``         CaptionJobs via ``Client.submit_many`` to a real blipq worker, results read
                    back via ``Client.results``

plus the idle latency of single blipq jobs over the bare model (each job's latency minus its own
model pass as timed in the worker; the worker's model pass is compared with the bare
single-image pass beside it), the batch sizes blipq ran, and the workers' peak RSS. ``bare`` and
the blipq worker run the model with SDPA vision attention (``worker.models.attention``);
``seed_loop`` and ``celery_naive`` run it as the model card loads it.

``--null-model`` replaces inference with a no-op (the ``null`` model family) and compares blipq
with the raw floor: a plain thread pool doing only S3 GET + decode + resize of the same images
(``floor``: boto3 get_object, PIL; ``floor_worker_code``: the worker's own reader and decoder, so
that blipq over it is the cost of the queue, batching and results alone),
and also runs ``blipq_null_chunked``: the same jobs in chunk messages of ``--per-message`` jobs
(``producer.protocol.chunks``).

The machine may be shared, so the modes are interleaved: every round runs each mode once, in
a rotating order, and ratios are medians of per-round ratios; idle latency is measured in
pairs (a bare single-image pass, then a single blipq job). CPU seconds per image (this process,
the workers, Redis and the S3 server together) are reported beside images/s: contention from
other work stretches wall time more than CPU time.

It starts its own Redis and S3 server (``producer.cli.embedded``); the images and the random-weight
BLIP-base checkpoint are built offline and cached (``BLIPQ_BENCH_CACHE``, default a temp dir).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from benchmarks.fixtures import ARCHS
from benchmarks.modes import (
    BUCKET,
    REPO,
    Bare,
    Blipq,
    CeleryNaive,
    Floor,
    NaiveWorker,
    SeedLoop,
    s3_client,
)
from benchmarks.processes import FloorMulti, ProcessCpu, S3Address, children, cpu_s, ms_per_image
from benchmarks.raypeer import ModelSpec, RayData, RayKnobs

GOALS = {
    "blipq/bare": (">=", 0.90),
    "blipq/seed_loop": (">=", 1.15),
    "blipq_null/floor": (">=", 0.80),
    "blipq_null_chunked/floor": (">=", 0.80),
    "idle_over_bare_p50_ms": ("<=", 25.0),
    "idle_over_bare_p99_ms": ("<=", 60.0),
}
STAGES = ("queue_wait", "fetch_decode_prepare", "batch_wait", "inference", "store_and_notify")


class Mode(Protocol):
    name: str
    keys: list[str]

    def warm(self) -> None: ...

    def run(self, keys: list[str]) -> int: ...


@dataclass
class Options:
    quick: bool
    null_model: bool
    model: str | None
    images: int
    jobs: int
    rounds: int
    latency_samples: int
    batch_sizes: list[int]
    floor_threads: list[int]
    max_new_tokens: int
    per_message: int
    max_batch_size: int | None
    max_wait_ms: float | None
    torch_threads: int | None
    omp_wait_policy: str
    sdpa: bool
    arch: str
    device: str
    dtype: str

    def placement(self) -> tuple[str, str]:
        """(device, dtype) for every mode: auto = CUDA in float16 when there is a GPU."""
        import torch

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = self.dtype
        if dtype == "auto":
            dtype = "float16" if device.startswith("cuda") else "float32"
        return device, dtype

    json_path: Path | None
    sim_ms: float | None = None
    sim_batch: int | None = None
    floor_multi: list[tuple[int, int]] = field(default_factory=list)
    intake_processes: list[int] = field(default_factory=list)
    ray: list[RayKnobs] = field(default_factory=list)
    worker_intake: int | None = None

    @property
    def sim_capacity(self) -> float:
        """The emulated device's images/s: BATCH images per MS milliseconds."""
        assert self.sim_ms is not None and self.sim_batch is not None
        return self.sim_batch * 1000 / self.sim_ms

    @property
    def generate_kwargs(self) -> dict[str, Any]:
        # Every mode decodes exactly this many tokens, greedily.
        n = self.max_new_tokens
        return {"max_new_tokens": n, "min_new_tokens": n, "num_beams": 1, "do_sample": False}


@dataclass
class Sample:
    images: int
    seconds: float
    cpu_s: float
    loadavg: float

    @property
    def rate(self) -> float:
        return self.images / self.seconds


@dataclass
class Report:
    options: dict[str, Any]
    machine: dict[str, Any]
    modes: dict[str, dict[str, Any]] = field(default_factory=dict)
    sweeps: dict[str, dict[str, float]] = field(default_factory=dict)
    ratios: dict[str, dict[str, Any]] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    batch_sizes: dict[str, dict[str, int]] = field(default_factory=dict)
    gpu: dict[str, Any] = field(default_factory=dict)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)
    goals: list[dict[str, Any]] = field(default_factory=list)
    cpu_ms_per_image: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per blipq mode, CPU ms per image of each worker process (and the model thread)."""
    cpu_accounting: dict[str, dict[str, float]] = field(default_factory=dict)
    """--null-model: CPU ms per image of every process a mode keeps busy, floor_multi's and
    blipq's, and what that bounds blipq / floor_multi to on a CPU-bound machine."""
    notes: list[str] = field(default_factory=list)


# --- measuring -----------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _loadavg() -> float:
    return round(os.getloadavg()[0], 2)


class CpuMeter:
    """CPU seconds used by this process and the given processes (workers, servers) together."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self._tick = os.sysconf("SC_CLK_TCK")

    def read(self) -> float:
        times = os.times()
        total = times.user + times.system
        for pid in self.pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / self._tick  # utime + stime
        return total


def measure(mode: Mode, keys: list[str], meter: CpuMeter) -> Sample:
    load = os.getloadavg()[0]
    cpu = meter.read()
    started = time.perf_counter()
    images = mode.run(keys)
    seconds = time.perf_counter() - started
    steady = getattr(mode, "steady", None)
    if steady is not None:
        # A mode that starts itself anew each run (Ray Data's actor pools) reports its rate
        # from its first output on; the start-up is reported apart.
        images, seconds = steady
    return Sample(images, seconds, meter.read() - cpu, round(load, 2))


def rounds(
    modes: list[Mode], keys: list[str], count: int, meter: CpuMeter
) -> dict[str, list[Sample]]:
    """Each round runs every mode once; the order rotates so no mode always goes first."""
    samples: dict[str, list[Sample]] = {mode.name: [] for mode in modes}
    for r in range(count):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        for mode in order:
            sample = measure(mode, keys, meter)
            samples[mode.name].append(sample)
            _log(
                f"round {r + 1}/{count} {mode.name}: {sample.rate:.3f} images/s "
                f"({sample.images} in {sample.seconds:.2f}s, load {sample.loadavg})"
            )
    return samples


def _pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation (p100 = the max)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {f"p{q}": round(_pct(values, q), 1) for q in (50, 95, 99)}


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _record(report: Report, samples: dict[str, list[Sample]], extra: dict[str, Any]) -> None:
    for name, runs in samples.items():
        report.modes[name] = {
            "images_per_s": round(statistics.median(s.rate for s in runs), 3),
            "images_per_s_rounds": [round(s.rate, 3) for s in runs],
            "cpu_s_per_image": round(statistics.median(s.cpu_s / s.images for s in runs), 4),
            "images_per_round": runs[0].images,
            "loadavg_rounds": [s.loadavg for s in runs],
            **extra.get(name, {}),
        }


def _ratio(report: Report, samples: dict[str, list[Sample]], top: str, base: str) -> None:
    per_round = [a.rate / b.rate for a, b in zip(samples[top], samples[base], strict=True)]
    report.ratios[f"{top}/{base}"] = {
        "median": round(statistics.median(per_round), 3),
        "rounds": [round(x, 3) for x in per_round],
    }
    if base.startswith("ray") or top.startswith("ray"):
        return  # Ray's worker processes come and go with each run: their CPU is not metered
    cpu = [
        (b.cpu_s / b.images) / (a.cpu_s / a.images)
        for a, b in zip(samples[top], samples[base], strict=True)
    ]
    # The same comparison on CPU seconds per image (base / top: > 1 means top is cheaper).
    report.ratios[f"{top}/{base}"]["cpu_efficiency"] = round(statistics.median(cpu), 3)


# --- the two benchmarks --------------------------------------------------------------------------


@dataclass
class Servers:
    redis: Any
    s3: Any
    keys: list[str]


def _blipq_env(opts: Options, servers: Servers, name: str, entry: dict[str, Any]) -> dict[str, str]:
    env = {
        "BLIPQ_REDIS_URL": servers.redis.url,
        "BLIPQ_S3_ENDPOINT_URL": servers.s3.endpoint_url,
        "BLIPQ_S3_ACCESS_KEY_ID": servers.s3.access_key,
        "BLIPQ_S3_SECRET_ACCESS_KEY": servers.s3.secret_key,
        "BLIPQ_MODELS": json.dumps({name: entry}),
        "BLIPQ_SERVE": name,
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    if opts.max_batch_size:
        env["BLIPQ_MAX_BATCH_SIZE"] = str(opts.max_batch_size)
    if opts.max_wait_ms is not None:
        env["BLIPQ_MAX_WAIT_MS"] = str(opts.max_wait_ms)
    if opts.torch_threads:
        env["BLIPQ_TORCH_THREADS"] = str(opts.torch_threads)
    if not opts.sdpa:
        env["BLIPQ_SDPA_ATTENTION"] = "false"
    if opts.worker_intake is not None:
        env["BLIPQ_INTAKE_PROCESSES"] = str(opts.worker_intake)
    env["BLIPQ_DEVICE"], env["BLIPQ_DTYPE"] = opts.placement()
    return env


def _naive_env(opts: Options, servers: Servers, source: str) -> dict[str, str]:
    env = {
        "BENCH_REDIS_URL": servers.redis.url,
        "BENCH_MODEL": source,
        "BENCH_S3_ENDPOINT_URL": servers.s3.endpoint_url,
        "BENCH_S3_ACCESS_KEY_ID": servers.s3.access_key,
        "BENCH_S3_SECRET_ACCESS_KEY": servers.s3.secret_key,
        "BENCH_GENERATE": json.dumps(opts.generate_kwargs),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    }
    if opts.torch_threads:
        env["OMP_NUM_THREADS"] = str(opts.torch_threads)
    env["BENCH_DEVICE"], env["BENCH_DTYPE"] = opts.placement()
    return env


def _idle_latency(
    report: Report,
    blipq: Blipq,
    keys: list[str],
    samples: int,
    bare: Bare | None,
) -> None:
    """Single jobs into an idle system, producer-side wall time; with ``bare``, each job follows
    a single-image pass of the bare model (so both see the same drift in background load)."""
    latencies, over_own, bare_ms = [], [], []
    stages: dict[str, list[float]] = {name: [] for name in STAGES}
    for i in range(samples):
        if bare is not None:
            bare_ms.append(bare.batch(1) * 1000)
        time.sleep(0.3)  # idle: nothing queued or running anywhere
        seconds, result = blipq.single(keys[i % len(keys)])
        ms = seconds * 1000
        latencies.append(ms)
        t = result.timings
        over_own.append(ms - t.inference_ms)
        stages["queue_wait"].append(t.queue_wait_ms)
        stages["fetch_decode_prepare"].append(t.fetch_ms)
        stages["batch_wait"].append(t.total_ms - t.queue_wait_ms - t.fetch_ms - t.inference_ms)
        stages["inference"].append(t.inference_ms)
        stages["store_and_notify"].append(ms - t.total_ms)
    entry: dict[str, Any] = {
        "samples": samples,
        "latency_ms": _summary(latencies),
        # Minus the model time of the job's own batch, measured in the worker: the system's
        # overhead per job, free of the model's run-to-run noise.
        "over_own_inference_ms": _summary(over_own),
        # Medians: submit -> task start; S3 GET + decode + preprocess; waiting for the batch
        # to close; the forward pass; result stored -> published -> in the producer's hands.
        "stages_p50_ms": {k: round(statistics.median(v), 1) for k, v in stages.items()},
    }
    if bare is not None:
        bare_p50 = statistics.median(bare_ms)
        model_p50 = statistics.median(stages["inference"])
        entry["bare_single_ms"] = _summary(bare_ms)
        # Naive: each job's latency minus the bare single-image median. On a shared CPU a
        # 1.4 s model pass varies by +-100 ms from run to run, which swamps a 25 ms goal.
        entry["latency_minus_bare_p50_ms"] = _summary([ms - bare_p50 for ms in latencies])
        # The goal's measure: each job's latency minus its own model pass (timed in the
        # worker), i.e. what the system adds around the model, free of the model's noise.
        # Whether the worker runs the model itself slower than bare is shown beside it (the
        # difference of medians; within +-100 ms of noise on a shared 2-core machine).
        entry["worker_model_pass_over_bare_p50_ms"] = round(model_p50 - bare_p50, 1)
        entry["over_bare_ms"] = entry["over_own_inference_ms"]
    report.latency[blipq.name] = entry


def _pid(worker: Any) -> int:
    """The process id of a started worker (a WorkerProcess or a NaiveWorker)."""
    if worker.proc is None:
        raise RuntimeError("worker is not started")
    return int(worker.proc.pid)


def _start_all(starters: list[Any]) -> None:
    """Start worker processes side by side (model loads overlap; nothing is timed yet)."""
    with ThreadPoolExecutor(len(starters)) as pool:
        for future in [pool.submit(start) for start in starters]:
            future.result()


def bench_model(
    report: Report, opts: Options, servers: Servers, source: str, paths: list[Path]
) -> None:
    import torch
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from producer import Client
    from producer.cli.embedded import WorkerProcess
    from worker.models.attention import use_sdpa_attention

    keys = servers.keys
    todo = [keys[i % len(keys)] for i in range(opts.jobs)]
    meter = CpuMeter()
    meter.pids += [servers.redis.proc.pid, servers.s3.proc.pid]
    naive_worker = NaiveWorker(_naive_env(opts, servers, source))
    blipq_worker = WorkerProcess(
        _blipq_env(opts, servers, "bench-caption", {"source": source, "family": "caption"}),
        cwd=REPO,
    )
    _log("starting the naive celery worker and the blipq worker (loads are not timed)")
    _start_all([naive_worker.start, lambda: blipq_worker.start(timeout=900)])
    naive = CeleryNaive(servers.redis.url)
    try:
        meter.pids += [_pid(naive_worker), _pid(blipq_worker)]
        processor = BlipProcessor.from_pretrained(source)
        # The model card's way for the seed loop; the limit (bare) is the model as the blipq
        # worker runs it: the same weights with SDPA vision attention (worker.models.attention).
        device, dtype = opts.placement()
        loaded = {"dtype": getattr(torch, dtype)}
        model = BlipForConditionalGeneration.from_pretrained(source, **loaded).to(device).eval()
        fast = BlipForConditionalGeneration.from_pretrained(source, **loaded).to(device).eval()
        if opts.sdpa:
            use_sdpa_attention(fast)
        tensors = [
            processor(Image.open(p).convert("RGB"), return_tensors="pt")["pixel_values"][0]
            for p in paths
        ]
        bare = Bare(fast, tensors, opts.generate_kwargs)
        eager = Bare(model, tensors, opts.generate_kwargs)
        seed = SeedLoop(processor, model, s3_client(servers.s3), opts.generate_kwargs)
        with Client(redis_url=servers.redis.url) as client:
            blipq = Blipq("blipq", client, "bench-caption", opts.max_new_tokens)
            modes: list[Mode] = [bare, seed, naive, blipq]
            for mode in modes:
                mode.keys = keys
                mode.warm()
            spec = ModelSpec(
                source,
                tuple(opts.generate_kwargs.items()),
                device,
                dtype,
                opts.torch_threads,
                opts.sdpa,
            )
            peer = _ray_peer(report, opts, servers, "ray", "obvious", spec, todo)
            if peer is not None:
                modes.append(peer)
            _log(f"warm; torch threads here: {torch.get_num_threads()}")
            sweep = {}
            for size in opts.batch_sizes:
                seconds = statistics.median(bare.batch(size) for _ in range(3 if size == 1 else 1))
                sweep[str(size)] = round(size / seconds, 3)
                _log(f"bare sweep: batch {size}: {sweep[str(size)]} images/s")
            bare.batch_size = int(max(sweep, key=lambda s: sweep[s]))
            report.sweeps["bare_images_per_s_by_batch_size"] = sweep
            if opts.sdpa:
                # What SDPA attention buys: the stock model at the same batch size, pairwise.
                size, gains = bare.batch_size, []
                for _ in range(3):
                    gains.append(eager.batch(size) / bare.batch(size))
                report.sweeps["sdpa_speedup_at_best_batch"] = {
                    str(size): round(statistics.median(gains), 3)
                }
                _log(f"SDPA attention: x{statistics.median(gains):.3f} at batch {size}")
            samples = rounds(modes, todo, opts.rounds, meter)
            _record(report, samples, {"bare": {"batch_size": bare.batch_size}})
            for base in ("bare", "seed_loop", "celery_naive") + (("ray",) if peer else ()):
                _ratio(report, samples, "blipq", base)
            # The most any batching system could gain over the seed loop on this machine.
            _ratio(report, samples, "bare", "seed_loop")
            report.batch_sizes["blipq"] = _histogram(blipq)
            if device.startswith("cuda"):
                free, total = torch.cuda.mem_get_info()
                report.gpu = {
                    "name": torch.cuda.get_device_name(),
                    "bare_peak_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20),
                    # Every process on the GPU (this one's two models, both workers' models).
                    "device_used_mib": round((total - free) / 2**20),
                }
            _log("idle latency: pairs of a bare single-image pass and a single blipq job")
            _idle_latency(report, blipq, keys, opts.latency_samples, bare)
        report.peak_rss_mib["blipq_worker"] = _peak_rss_mib(_pid(blipq_worker))
        report.peak_rss_mib["celery_naive_worker"] = _peak_rss_mib(_pid(naive_worker))
    finally:
        naive.close()
        naive_worker.stop()
        code = blipq_worker.stop()
        if code not in (0, None):
            report.notes.append(f"blipq worker exited {code}; log: {blipq_worker.log_path}")


def bench_null(report: Report, opts: Options, servers: Servers) -> None:
    from producer import Client
    from producer.cli.embedded import WorkerProcess

    keys = servers.keys
    todo = [keys[i % len(keys)] for i in range(opts.jobs)]
    meter = CpuMeter()
    meter.pids += [servers.redis.proc.pid, servers.s3.proc.pid]
    worker = WorkerProcess(
        _blipq_env(opts, servers, "null", {"source": "null", "family": "null"}), cwd=REPO
    ).start()
    try:
        meter.pids.append(_pid(worker))
        floor = Floor(servers.s3, opts.floor_threads[0])
        with Client(redis_url=servers.redis.url) as client:
            blipq = Blipq("blipq_null", client, "null", opts.max_new_tokens, warm_burst=100)
            modes: list[Mode] = [floor, blipq]
            chunked = None
            if opts.per_message > 1:
                chunked = Blipq(
                    "blipq_null_chunked",
                    client,
                    "null",
                    opts.max_new_tokens,
                    warm_burst=100,
                    per_message=opts.per_message,
                )
                modes.append(chunked)
            for mode in modes:
                mode.keys = keys
                mode.warm()
            sweep = {}
            for threads in opts.floor_threads:
                floor.set_threads(threads)
                floor.warm()
                sweep[str(threads)] = round(measure(floor, todo, meter).rate, 2)
                _log(f"floor sweep: {threads} threads: {sweep[str(threads)]} images/s")
            floor.set_threads(int(max(sweep, key=lambda t: sweep[t])))
            floor.warm()
            report.sweeps["floor_images_per_s_by_threads"] = sweep
            same_code = Floor(servers.s3, floor.threads, worker_code=True)
            same_code.keys = keys
            same_code.warm()
            modes.insert(1, same_code)
            multi = _floor_multi(report, opts, servers, meter)
            if multi is not None:
                modes.insert(2, multi)
            peers = [
                _ray_peer(report, opts, servers, f"ray_null_{code}", code, ModelSpec(), todo)
                for code in ("obvious", "blipq")
            ]
            modes += [peer for peer in peers if peer is not None]
            samples = rounds(modes, todo, opts.rounds, meter)
            threads = {"threads": floor.threads}
            _record(report, samples, {"floor": threads, same_code.name: threads})
            _ratio(report, samples, "blipq_null", "floor")
            _ratio(report, samples, "blipq_null", same_code.name)
            if multi is not None:
                _ratio(report, samples, "blipq_null", multi.name)
                report.modes[multi.name]["threads"] = f"{multi.processes}x{multi.threads}"
            _peer_ratios(report, samples, [p for p in peers if p], chunked, multi)
            report.batch_sizes["blipq_null"] = _histogram(blipq)
            if chunked is not None:
                _ratio(report, samples, "blipq_null_chunked", "floor")
                _ratio(report, samples, "blipq_null_chunked", same_code.name)
                _ratio(report, samples, "blipq_null_chunked", "blipq_null")
                if multi is not None:
                    _ratio(report, samples, "blipq_null_chunked", multi.name)
                report.batch_sizes["blipq_null_chunked"] = _histogram(chunked)
                report.modes["blipq_null_chunked"]["per_message"] = opts.per_message
            if multi is not None:  # it reads the worker's processes too
                _cpu_accounting(report, servers, _pid(worker), multi, [blipq, chunked], todo)
                multi.close()
            else:
                _process_cpu(report, _pid(worker), blipq, todo)
            _log("idle latency: single null jobs (no model time at all)")
            _idle_latency(report, blipq, keys, opts.latency_samples, None)
        report.peak_rss_mib["blipq_null_worker"] = _peak_rss_mib(_pid(worker))
    finally:
        code = worker.stop()
        if code not in (0, None):
            report.notes.append(f"blipq worker exited {code}; log: {worker.log_path}")


def _process_cpu(report: Report, worker_pid: int, blipq: Blipq, todo: list[str]) -> None:
    """One more run of ``blipq``: CPU ms per image of each of the worker's processes."""
    cpu = ProcessCpu(worker_pid)
    before = cpu.snapshot()
    images = blipq.run(todo)
    report.cpu_ms_per_image[blipq.name] = ms_per_image(before, cpu.snapshot(), images)
    _log(f"{blipq.name} CPU ms per image: {report.cpu_ms_per_image[blipq.name]}")


def _cpu_accounting(
    report: Report,
    servers: Servers,
    worker_pid: int,
    multi: FloorMulti,
    modes: list[Blipq | None],
    todo: list[str],
) -> None:
    """One more run of floor_multi and of each blipq mode, CPU ms per image of every process
    each keeps busy: its own (floor processes; the worker's processes), the S3 server, Redis and
    this process (blipq's producer and result reader; nothing for the floor). On a machine whose
    cores they all share, images/s can be at most cores / total, so floor_multi's total over
    blipq's bounds blipq / floor_multi (``cpu_bound``); with nothing spent in the worker beyond
    the floor's own work, the bound would still be floor / (floor + Redis + producer + model
    process) (``bound_without_intake_overhead``). Each mode's worker processes alone go to
    ``cpu_ms_per_image``, as ``_process_cpu`` reports them."""

    def servers_and_self() -> dict[str, float]:
        times = os.times()
        return {
            "s3_server": cpu_s(servers.s3.proc.pid)
            + sum(cpu_s(pid) for pid in children(servers.s3.proc.pid)),
            "redis": cpu_s(servers.redis.proc.pid),
            "producer": times.user + times.system,
        }

    pids = multi.pids
    before = {"floor_processes": sum(cpu_s(pid) for pid in pids), **servers_and_self()}
    images = multi.run(todo)
    after = {"floor_processes": sum(cpu_s(pid) for pid in pids), **servers_and_self()}
    floor = ms_per_image(before, after, images)
    floor["total"] = round(sum(floor.values()), 3)
    report.cpu_accounting[multi.name] = floor
    for mode in modes:
        if mode is None:
            continue
        cpu = ProcessCpu(worker_pid)
        before = {**cpu.snapshot(), **servers_and_self()}
        images = mode.run(todo)
        spent = ms_per_image(before, {**cpu.snapshot(), **servers_and_self()}, images)
        report.cpu_ms_per_image[mode.name] = {
            role: ms for role, ms in spent.items() if role not in ("s3_server", "redis", "producer")
        }
        spent.pop("model_thread", None)  # inside its process's figure
        spent["total"] = round(sum(spent.values()), 3)
        own = floor["floor_processes"] + floor["s3_server"]
        rest = spent["redis"] + spent["producer"] + spent.get("model_process", 0.0)
        spent["cpu_bound"] = round(floor["total"] / spent["total"], 3)
        spent["bound_without_intake_overhead"] = round(own / (own + rest), 3)
        report.cpu_accounting[mode.name] = spent
        _log(f"{mode.name} CPU ms per image, every process: {spent}")


def _floor_multi(report: Report, opts: Options, servers: Servers, meter: CpuMeter) -> Any:
    """Sweep processes x threads of the worker's GET + decode + resize; keep the best."""
    address = S3Address(servers.s3.endpoint_url, servers.s3.access_key, servers.s3.secret_key)
    todo = [servers.keys[i % len(servers.keys)] for i in range(opts.jobs)]
    sweep: dict[str, float] = {}
    best: tuple[float, FloorMulti] | None = None
    for processes, threads in opts.floor_multi:
        floor = FloorMulti(address, processes, threads)
        floor.keys = servers.keys
        floor.warm()
        meter.pids += floor.pids  # its processes' CPU counts with the rest
        rate = measure(floor, todo, meter).rate
        sweep[f"{processes}x{threads}"] = round(rate, 2)
        _log(f"floor_multi sweep: {processes} processes x {threads} threads: {rate:.1f} images/s")
        if best is None or rate > best[0]:
            best, floor = (rate, floor), (best[1] if best else None)
        if floor is not None:
            meter.pids = [pid for pid in meter.pids if pid not in floor.pids]
            floor.close()
    report.sweeps["floor_multi_images_per_s_by_processes_x_threads"] = sweep
    return None if best is None else best[1]


def _peer_ratios(
    report: Report,
    samples: dict[str, list[Sample]],
    peers: list[RayData],
    chunked: Blipq | None,
    multi: FloorMulti | None,
) -> None:
    for peer in peers:
        _ratio(report, samples, "blipq_null", peer.name)
        if chunked is not None:
            _ratio(report, samples, chunked.name, peer.name)
        if multi is not None:
            _ratio(report, samples, peer.name, multi.name)


def _ray_peer(
    report: Report,
    opts: Options,
    servers: Servers,
    name: str,
    code: str,
    spec: ModelSpec,
    todo: list[str],
) -> RayData | None:
    """Ray Data with each of ``--ray`` knob settings on ``todo`` once; the best, warm."""
    if not opts.ray:
        return None
    from benchmarks import raypeer

    if "ray_init_s" not in report.machine:
        report.machine["ray_init_s"] = raypeer.start(os.cpu_count() or 1)
    address = S3Address(servers.s3.endpoint_url, servers.s3.access_key, servers.s3.secret_key)
    sweep: dict[str, float] = {}
    best: tuple[float, RayData] | None = None
    for knobs in opts.ray:
        peer = RayData(name, address, code, spec, knobs)
        peer.keys = servers.keys
        peer.warm()
        images = peer.run(todo)
        rate = images / (peer.steady[1] if peer.steady else peer.wall_s)
        sweep[str(knobs)] = round(rate, 2)
        _log(f"{name} sweep: {knobs}: {rate:.1f} images/s, start-up {peer.startup_s} s apart")
        if best is None or rate > best[0]:
            best = (rate, peer)
    assert best is not None
    report.sweeps[f"{name}_images_per_s_by_knobs"] = sweep
    peer = best[1]
    peer.warm()
    report.notes.append(
        f"{name}: {peer.knobs}; Ray Data's start-up per run (median run of one batch): "
        f"{peer.startup_s} s, taken out of each round's time"
    )
    return peer


def intake_scaling(
    report: Report, opts: Options, servers: Servers, name: str, entry: dict[str, Any]
) -> None:
    """blipq with each of ``--intake-processes``, a worker of its own each: images/s (median of
    the rounds) and CPU ms per image of every process."""
    from producer import Client
    from producer.cli.embedded import WorkerProcess

    keys = servers.keys
    todo = [keys[i % len(keys)] for i in range(opts.jobs)]
    table: dict[str, float] = {}
    for count in opts.intake_processes:
        env = _blipq_env(opts, servers, name, entry)
        if opts.sim_batch is not None:
            env.setdefault("BLIPQ_MAX_BATCH_SIZE", str(opts.sim_batch))
        env["BLIPQ_INTAKE_PROCESSES"] = str(count)
        worker = WorkerProcess(env, cwd=REPO).start()
        try:
            with Client(redis_url=servers.redis.url) as client:
                blipq = Blipq(
                    f"blipq_{name}_intake_{count}",
                    client,
                    name,
                    opts.max_new_tokens,
                    warm_burst=100,
                )
                blipq.keys = keys
                blipq.warm()
                rates = []
                for _ in range(opts.rounds):
                    started = time.perf_counter()
                    rates.append(blipq.run(todo) / (time.perf_counter() - started))
                table[str(count)] = round(statistics.median(rates), 1)
                _log(f"{name}, {count} intake processes: {table[str(count)]} images/s")
                _process_cpu(report, _pid(worker), blipq, todo)
        finally:
            code = worker.stop()
            if code not in (0, None):
                report.notes.append(f"blipq worker exited {code}; log: {worker.log_path}")
    report.sweeps[f"{name}_images_per_s_by_intake_processes"] = table


def bench_sim(report: Report, opts: Options, servers: Servers) -> None:
    """blipq against an emulated accelerator (``--sim-model MS[:BATCH]``)."""
    from producer import Client
    from producer.cli.embedded import WorkerProcess

    assert opts.sim_ms is not None and opts.sim_batch is not None
    keys = servers.keys
    todo = [keys[i % len(keys)] for i in range(opts.jobs)]
    meter = CpuMeter()
    meter.pids += [servers.redis.proc.pid, servers.s3.proc.pid]
    entry = {"source": f"sim:{opts.sim_ms:g}", "family": "sim"}
    env = _blipq_env(opts, servers, "sim", entry)
    # Batches of BATCH, and (by default) 2 x BATCH + 4 threads to fill them.
    env.setdefault("BLIPQ_MAX_BATCH_SIZE", str(opts.sim_batch))
    worker = WorkerProcess(env, cwd=REPO).start()
    try:
        meter.pids.append(_pid(worker))
        with Client(redis_url=servers.redis.url) as client:
            blipq = Blipq("blipq_sim", client, "sim", opts.max_new_tokens, warm_burst=100)
            blipq.keys = keys
            blipq.warm()
            samples = rounds([blipq], todo, opts.rounds, meter)
            _record(report, samples, {})
            capacity = opts.sim_capacity
            per_round = [s.rate / capacity for s in samples["blipq_sim"]]
            report.ratios["blipq_sim/capacity"] = {
                "median": round(statistics.median(per_round), 3),
                "rounds": [round(x, 3) for x in per_round],
                "cpu_efficiency": None,  # no baseline process to compare CPU with
            }
            report.sweeps["sim_model"] = {
                "ms_per_batch": opts.sim_ms,
                "batch": opts.sim_batch,
                "capacity_images_per_s": round(capacity, 1),
            }
            report.batch_sizes["blipq_sim"] = _histogram(blipq)
            _process_cpu(report, _pid(worker), blipq, todo)
    finally:
        code = worker.stop()
        if code not in (0, None):
            report.notes.append(f"blipq worker exited {code}; log: {worker.log_path}")


def _histogram(blipq: Blipq) -> dict[str, int]:
    """Batches run, by size (from each job's JobResult.batch_size: jobs / size)."""
    return {str(size): jobs // size for size, jobs in sorted(blipq.batch_sizes.items())}


# --- report --------------------------------------------------------------------------------------


def _goals(report: Report) -> None:
    measured: dict[str, float] = {k: v["median"] for k, v in report.ratios.items()}
    over = report.latency.get("blipq", {}).get("over_bare_ms")
    if over:
        measured["idle_over_bare_p50_ms"] = over["p50"]
        measured["idle_over_bare_p99_ms"] = over["p99"]
    for name, (op, target) in GOALS.items():
        if name in measured:
            value = measured[name]
            met = value >= target if op == ">=" else value <= target
            report.goals.append(
                {"goal": name, "target": f"{op} {target}", "measured": value, "met": met}
            )


def _modes_table(report: Report) -> list[str]:
    out = [
        "| mode | images/s (median of rounds) | rounds | CPU s / image | load avg |",
        "|---|---:|---|---:|---|",
    ]
    for name, m in report.modes.items():
        label = name
        if "batch_size" in m:
            label += f" (batch {m['batch_size']})"
        if "threads" in m:
            label += f" ({m['threads']} threads)"
        if "per_message" in m:
            label += f" ({m['per_message']} jobs per message)"
        rounds_ = ", ".join(f"{x:.3g}" for x in m["images_per_s_rounds"])
        loads = ", ".join(f"{x:.1f}" for x in m["loadavg_rounds"])
        out.append(
            f"| {label} | {m['images_per_s']:.3g} | {rounds_} | {m['cpu_s_per_image']:.3g} "
            f"| {loads} |"
        )
    for name, sweep in report.sweeps.items():
        out.append(f"\n{name}: " + ", ".join(f"{k}: {v}" for k, v in sweep.items()))
    out += ["", "| ratio | median of rounds | rounds | CPU-time ratio |", "|---|---:|---|---:|"]
    for name, r in report.ratios.items():
        rounds_ = ", ".join(f"{x:.3f}" for x in r["rounds"])
        cpu = "-" if r.get("cpu_efficiency") is None else f"{r['cpu_efficiency']:.3f}"
        out.append(f"| {name} | {r['median']:.3f} | {rounds_} | {cpu} |")
    return out


def _latency_table(mode: str, lat: dict[str, Any]) -> list[str]:
    out = [
        "",
        f"idle latency, {mode} ({lat['samples']} single jobs), ms:",
        "| measure | p50 | p95 | p99 |",
        "|---|---:|---:|---:|",
    ]
    rows = [("end-to-end (submit -> result in hand)", lat["latency_ms"])]
    if "over_bare_ms" in lat:
        rows.append(("bare model, one image", lat["bare_single_ms"]))
        rows.append(("latency - bare single-image p50 (noisy)", lat["latency_minus_bare_p50_ms"]))
    rows.append(("**over bare**: latency - the job's own model pass", lat["over_own_inference_ms"]))
    out += [f"| {label} | {s['p50']} | {s['p95']} | {s['p99']} |" for label, s in rows]
    if "worker_model_pass_over_bare_p50_ms" in lat:
        excess = lat["worker_model_pass_over_bare_p50_ms"]
        out.append(f"\nworker's model pass minus the bare pass (medians): {excess} ms")
    stages = ", ".join(f"{k} {v}" for k, v in lat["stages_p50_ms"].items())
    out.append(f"\nwhere a single job's time goes (p50, ms): {stages}")
    return out


def render(report: Report) -> str:
    out = ["", *_modes_table(report)]
    for mode, lat in report.latency.items():
        out += _latency_table(mode, lat)
    for mode, hist in report.batch_sizes.items():
        out.append(f"\n{mode} batches by size: " + ", ".join(f"{k}: {v}" for k, v in hist.items()))
    if report.gpu:
        out.append("GPU: " + ", ".join(f"{k} {v}" for k, v in report.gpu.items()))
    for mode, cpu in report.cpu_ms_per_image.items():
        out.append(f"\n{mode} CPU ms per image: " + ", ".join(f"{k} {v}" for k, v in cpu.items()))
    for mode, spent in report.cpu_accounting.items():
        shown = ", ".join(f"{k} {v}" for k, v in spent.items())
        out.append(f"\n{mode} CPU ms per image, every process it keeps busy: {shown}")
    if report.peak_rss_mib:
        rss = ", ".join(f"{k} {v:.0f} MiB" for k, v in report.peak_rss_mib.items())
        out.append(f"peak RSS (VmHWM): {rss}")
    out += ["", "| goal | target | measured | met |", "|---|---|---:|---|"]
    for g in report.goals:
        met = "yes" if g["met"] else "**no**"
        out.append(f"| {g['goal']} | {g['target']} | {g['measured']} | {met} |")
    out += [f"note: {note}" for note in report.notes]
    return "\n".join(out)


# --- main ----------------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        description="blipq vs the bare model, the model-card loop and naive Celery (or, with "
        "--null-model, vs the raw S3+decode+resize floor).",
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="small counts (a few minutes on 2 cores)")
    add("--null-model", action="store_true", help="no-op model: blipq overhead vs the raw floor")
    add("--model", help="hub id or local dir (default: a random-weight BLIP-base, built here)")
    add("--images", type=int, help="distinct images uploaded")
    add("--jobs", type=int, help="images per mode per round")
    add("--rounds", type=int, help="rounds (each runs every mode once, rotating the order)")
    add("--latency-samples", type=int, help="single jobs at idle")
    add("--batch-sizes", help="bare batch sizes to try, e.g. 1,4,8,16")
    add("--floor-threads", help="floor thread counts to try, e.g. 2,4,16")
    add("--max-new-tokens", type=int, default=8, help="fixed decode length (default 8)")
    add(
        "--per-message",
        type=int,
        default=16,
        help="jobs per chunk message of blipq_null_chunked (--null-model; default 16, 1: skip it)",
    )
    add("--max-batch-size", type=int, help="BLIPQ_MAX_BATCH_SIZE of the worker")
    add("--max-wait-ms", type=float, help="BLIPQ_MAX_WAIT_MS of the worker")
    add("--torch-threads", type=int, help="torch threads in every mode (default: all cores)")
    add(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY for every process (default PASSIVE; 'inherit' leaves it as is): "
        "on a shared CPU, OpenMP's spin-waiting made a 2-thread model up to 5x slower",
    )
    add(
        "--eager-attention",
        action="store_true",
        help="run the blipq worker and bare with transformers' eager BLIP attention "
        "(BLIPQ_SDPA_ATTENTION=false)",
    )
    add("--arch", choices=ARCHS, default="base", help="random-weight BLIP to build")
    add("--device", default="auto", help="auto | cpu | cuda | cuda:N, for every mode")
    add(
        "--dtype",
        choices=["auto", "float32", "float16", "bfloat16"],
        default="auto",
        help="auto: float16 on CUDA (the model card's GPU recipe), float32 on CPU",
    )
    add(
        "--sim-model",
        metavar="MS[:BATCH]",
        help="an emulated accelerator: a model family whose batch of at most BATCH items "
        "(default 16) sleeps MS milliseconds with the GIL released; blipq vs BATCH*1000/MS",
    )
    add(
        "--floor-multi",
        default="1x16,2x8",
        help="--null-model: floor_multi sweep, PROCESSESxTHREADS comma-separated (default "
        "1x16,2x8; '' skips it): the worker's GET + decode + resize in several processes",
    )
    add(
        "--intake-processes",
        default="",
        help="--null-model / --sim-model: also a scaling table of blipq over "
        "BLIPQ_INTAKE_PROCESSES, e.g. 0,1,2 (0 = one process; N = a model process and N intake "
        "processes), each a worker of its own",
    )
    add(
        "--ray",
        nargs="?",
        const="1x4x16,2x4x16,2x8x32",
        default="",
        metavar="AxTxB,...",
        help="also run Ray Data peers (pip install 'blipq[bench]'), sweeping A preprocessing "
        "actors x T threads each x batch size B (default when given without a value: "
        "1x4x16,2x4x16,2x8x32)",
    )
    add(
        "--worker-intake",
        type=int,
        help="BLIPQ_INTAKE_PROCESSES of the blipq worker (default: the worker's own default)",
    )
    add("--json", type=Path, help="also write the report as JSON to this path")
    a = parser.parse_args(argv)
    if a.sim_model and a.null_model:
        parser.error("--sim-model and --null-model are two benchmarks: give one")
    sim_ms, sim_batch = _sim_model(parser, a.sim_model) if a.sim_model else (None, None)
    # images, jobs, rounds, latency samples, bare batch sizes
    if a.null_model or a.sim_model:
        d = (32, 200, 3, 20, "1") if a.quick else (64, 1000, 5, 50, "1")
    else:
        d = (8, 8, 2, 6, "1,4,8") if a.quick else (32, 32, 3, 30, "1,4,8,16")
    return Options(
        quick=a.quick,
        null_model=a.null_model,
        model=a.model,
        images=a.images or d[0],
        jobs=a.jobs or d[1],
        rounds=a.rounds or d[2],
        latency_samples=a.latency_samples or d[3],
        batch_sizes=[int(s) for s in (a.batch_sizes or d[4]).split(",")],
        floor_threads=[int(s) for s in (a.floor_threads or "2,4,16").split(",")],
        max_new_tokens=a.max_new_tokens,
        per_message=a.per_message,
        max_batch_size=a.max_batch_size,
        max_wait_ms=a.max_wait_ms,
        torch_threads=a.torch_threads,
        omp_wait_policy=a.omp_wait_policy,
        sdpa=not a.eager_attention,
        arch=a.arch,
        device=a.device,
        dtype=a.dtype,
        json_path=a.json,
        sim_ms=sim_ms,
        sim_batch=sim_batch,
        floor_multi=_floor_multi_sweep(parser, a.floor_multi),
        intake_processes=_counts(parser, a.intake_processes),
        ray=_ray_sweep(parser, a.ray),
        worker_intake=a.worker_intake,
    )


def _ray_sweep(parser: argparse.ArgumentParser, value: str) -> list[RayKnobs]:
    sweep = []
    for part in filter(None, value.split(",")):
        fields = part.split("x")
        if len(fields) != 3 or not all(f.isdigit() and int(f) >= 1 for f in fields):
            parser.error(f"--ray is ACTORSxTHREADSxBATCH,..., e.g. 2x4x16, not {part!r}")
        sweep.append(RayKnobs(*(int(f) for f in fields)))
    if sweep:
        from benchmarks import raypeer

        if not raypeer.available():
            parser.error("--ray needs Ray Data: pip install 'blipq[bench]'")
    return sweep


def _counts(parser: argparse.ArgumentParser, value: str) -> list[int]:
    parts = [p for p in value.split(",") if p]
    if not all(p.isdigit() for p in parts):
        parser.error(f"--intake-processes is a list of counts, e.g. 0,1,2, not {value!r}")
    return [int(p) for p in parts]


def _sim_model(parser: argparse.ArgumentParser, value: str) -> tuple[float, int]:
    ms, _, batch = value.partition(":")
    try:
        parsed = float(ms), int(batch or 16)
    except ValueError:
        parser.error(f"--sim-model is MS[:BATCH], e.g. 20:32, not {value!r}")
    if parsed[0] <= 0 or parsed[1] < 1:
        parser.error(f"--sim-model needs MS > 0 and BATCH >= 1, not {value!r}")
    return parsed


def _floor_multi_sweep(parser: argparse.ArgumentParser, value: str) -> list[tuple[int, int]]:
    sweep = []
    for part in filter(None, value.split(",")):
        p, _, t = part.partition("x")
        if not (p.isdigit() and t.isdigit() and int(p) >= 1 and int(t) >= 1):
            parser.error(f"--floor-multi is PROCESSESxTHREADS,..., e.g. 2x8, not {part!r}")
        sweep.append((int(p), int(t)))
    return sweep


def _upload(s3_server: Any, paths: list[Path]) -> list[str]:
    s3 = s3_client(s3_server)
    s3.create_bucket(Bucket=BUCKET)
    for path in paths:
        s3.put_object(Bucket=BUCKET, Key=path.name, Body=path.read_bytes())
    return [path.name for path in paths]


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if opts.omp_wait_policy != "inherit":
        # Before torch loads libgomp; the workers inherit it: one policy for every mode.
        os.environ["OMP_WAIT_POLICY"] = opts.omp_wait_policy
    import torch

    from benchmarks import fixtures
    from producer.cli.embedded import EmbeddedRedis, EmbeddedS3

    started = time.perf_counter()
    if opts.torch_threads:
        torch.set_num_threads(opts.torch_threads)
    paths = fixtures.photos(opts.images)
    sizes = [p.stat().st_size // 1000 for p in paths]
    report = Report(
        options={
            k: str(v) if isinstance(v, Path) else [str(r) for r in v] if k == "ray" else v
            for k, v in vars(opts).items()
        },
        machine={
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "images_kb": [min(sizes), max(sizes)],
            "loadavg_at_start": _loadavg(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
            "device_dtype": list(opts.placement()),
        },
    )
    source = opts.model
    if not opts.null_model and opts.sim_ms is None and source is None:
        _log(f"building (or reusing) the random-weight BLIP-{opts.arch} checkpoint")
        source = str(fixtures.blip_random(opts.arch))
    report.options["model"] = source or ("null" if opts.null_model else "sim")
    redis_server = EmbeddedRedis().start()
    s3_server = EmbeddedS3().start()
    try:
        servers = Servers(redis_server, s3_server, _upload(s3_server, paths))
        _log(f"uploaded {len(paths)} images of {min(sizes)}-{max(sizes)} KB")
        if opts.null_model:
            bench_null(report, opts, servers)
            if opts.intake_processes:
                intake_scaling(report, opts, servers, "null", {"source": "null", "family": "null"})
        elif opts.sim_ms is not None:
            bench_sim(report, opts, servers)
            if opts.intake_processes:
                sim = {"source": f"sim:{opts.sim_ms:g}", "family": "sim"}
                intake_scaling(report, opts, servers, "sim", sim)
        else:
            assert source is not None
            bench_model(report, opts, servers, source, paths)
    finally:
        if opts.ray:
            from benchmarks import raypeer

            raypeer.stop()
        s3_server.close()
        redis_server.close()
    report.machine["loadavg_at_end"] = _loadavg()
    report.machine["total_s"] = round(time.perf_counter() - started, 1)
    _goals(report)
    print(render(report))
    print(f"\ntotal {report.machine['total_s']} s on {os.cpu_count()} CPUs")
    if opts.json_path:
        opts.json_path.write_text(json.dumps(vars(report), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
