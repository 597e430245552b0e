"""Ray Data as a peer of blipq (``python -m benchmarks.throughput --ray``; ``pip install
'blipq[bench]'``).

The same images from the same S3 server go through a Ray Data pipeline the way its docs build
batch inference: ``from_items(keys)`` -> ``map_batches(Preprocess)`` in an actor pool (GET +
decode + resize) -> ``map_batches(Model)`` in an actor pool of one (the model, loaded once per
actor) -> iterate the outputs. Two preprocessing codes:

- ``obvious``: boto3 ``get_object``, ``PIL.Image.open``, Pillow's resize (the null model) or the
  model's ``BlipProcessor`` (the model), as a Ray user writes it;
- ``blipq``: the worker's own reader, decoder and resize (``worker.storage``, ``worker.images``,
  ``worker.models.resize``), so that blipq over it is the cost of each system's machinery alone.

Knobs swept (``RayKnobs``): preprocessing actors, threads inside each (the GETs wait on the
network), and the batch size; the best is kept for the measured rounds. Ray Data starts its actor
pools for every execution (several seconds on 2 cores): it is measured apart (``startup_s``, the
median wall time of runs of one batch) and taken out of each run's time (``steady``), as a long
bulk run would amortise it.
"""

from __future__ import annotations

import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from benchmarks.modes import BUCKET, NULL_INPUT_SIZE, worker_pixels, worker_reader
from benchmarks.processes import S3Address


@dataclass(frozen=True)
class RayKnobs:
    actors: int
    threads: int
    batch_size: int

    def __str__(self) -> str:
        return f"{self.actors}a x {self.threads}t, batch {self.batch_size}"


@dataclass(frozen=True)
class ModelSpec:
    """What the model actor loads: ``source`` None = the null model (a no-op per batch)."""

    source: str | None = None
    generate: tuple[tuple[str, Any], ...] = ()
    device: str = "cpu"
    dtype: str = "float32"
    torch_threads: int | None = None
    sdpa: bool = True


class Preprocess:
    """A Ray Data actor: keys in, pixels out (numpy, through Ray's shared-memory object store)."""

    def __init__(self, address: S3Address, code: str, threads: int, source: str | None) -> None:
        self.code = code
        self.s3 = address.client(pool=max(10, threads))
        self.pool = ThreadPoolExecutor(threads)
        self.processor: Any = None
        if source is not None:
            from transformers import BlipProcessor

            self.processor = BlipProcessor.from_pretrained(source)
            self.side = int(self.processor.image_processor.size["height"])
        else:
            self.side = NULL_INPUT_SIZE
        if code == "blipq":
            self.reader = worker_reader(self.s3, threads)

    def one(self, key: str) -> Any:
        import numpy as np
        from PIL import Image

        if self.code == "blipq":
            return worker_pixels(self.reader, key, self.side).numpy()
        body = self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        image = Image.open(io.BytesIO(body)).convert("RGB")
        if self.processor is not None:
            return self.processor(images=image, return_tensors="np")["pixel_values"][0]
        resized = image.resize((self.side, self.side), resample=Image.Resampling.BICUBIC)
        return np.asarray(resized).transpose(2, 0, 1)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        return {"pixels": np.stack(list(self.pool.map(self.one, batch["key"])))}


class Model:
    """A Ray Data actor holding the model (or the null model): pixels in, one output per row."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model: Any = None
        if spec.source is None:
            return
        import torch
        from transformers import BlipForConditionalGeneration

        from worker.models.attention import use_sdpa_attention

        # Ray sets OMP_NUM_THREADS to an actor's CPUs; give the model what bare has.
        torch.set_num_threads(spec.torch_threads or os.cpu_count() or 1)
        self.dtype = getattr(torch, spec.dtype)
        model = BlipForConditionalGeneration.from_pretrained(spec.source, dtype=self.dtype)
        self.model = model.to(spec.device).eval()
        if spec.sdpa:
            use_sdpa_attention(self.model)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        pixels = batch["pixels"]
        if self.model is None:
            return {"out": np.asarray([p.shape[-1] for p in pixels])}
        import torch

        with torch.inference_mode():
            tensor = torch.from_numpy(np.ascontiguousarray(pixels))
            tensor = tensor.to(self.spec.device, self.dtype)
            tokens = self.model.generate(pixel_values=tensor, **dict(self.spec.generate))
        return {"out": tokens[:, -1].cpu().numpy()}


class RayData:
    """One Ray Data pipeline as a benchmark mode (``warm``/``run`` like the others)."""

    def __init__(
        self,
        name: str,
        address: S3Address,
        code: str,
        model: ModelSpec,
        knobs: RayKnobs,
    ) -> None:
        self.name = name
        self.address = address
        self.code = code
        self.model = model
        self.knobs = knobs
        self.keys: list[str] = []
        self.startup_s: float | None = None
        """A run's start-up (actor pools, model load): the median wall time of runs of one
        batch, measured by ``warm``."""
        self.steady: tuple[int, float] | None = None
        """(images, seconds) of the last run without the start-up."""
        self.wall_s = 0.0

    def run(self, keys: list[str]) -> int:
        import ray.data

        k = self.knobs
        ds = ray.data.from_items([{"key": key} for key in keys])
        ds = ds.map_batches(
            Preprocess,
            fn_constructor_args=(self.address, self.code, k.threads, self.model.source),
            batch_size=k.batch_size,
            compute=ray.data.ActorPoolStrategy(size=k.actors),
            num_cpus=1,
        )
        ds = ds.map_batches(
            Model,
            fn_constructor_args=(self.model,),
            batch_size=k.batch_size,
            compute=ray.data.ActorPoolStrategy(size=1),
            # The model's actor takes no CPU slot of its own (the preprocessing actors get every
            # core), as blipq's model thread shares the cores with its intake.
            num_cpus=0.01,
        )
        started = time.perf_counter()
        images = sum(len(batch["out"]) for batch in ds.iter_batches(batch_size=None))
        wall = time.perf_counter() - started
        self.wall_s = wall
        if self.startup_s is not None and wall > 2 * self.startup_s:
            # Without the start-up, measured apart (a run of one batch; it includes that
            # batch's work, so what is left is slightly in Ray's favour).
            self.steady = (images, wall - self.startup_s)
        else:
            self.steady = None  # too short a run to take the start-up out: the wall time
        return images

    def warm(self) -> None:
        tiny = self.keys[: self.knobs.batch_size]
        walls = []
        for _ in range(3):
            started = time.perf_counter()
            self.run(tiny)
            walls.append(time.perf_counter() - started)
        self.startup_s = round(sorted(walls)[1], 2)


def start(cpus: int) -> float:
    """Start a local Ray (its dashboard off, quiet); the seconds it took."""
    import ray
    from ray.data import DataContext

    from benchmarks.modes import REPO

    paths = [str(REPO), os.environ.get("PYTHONPATH", "")]
    started = time.perf_counter()
    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        # Its worker processes import this module, the worker's code and the producer's.
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, paths))}},
    )
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return round(time.perf_counter() - started, 2)


def stop() -> None:
    import ray

    ray.shutdown()


def available() -> bool:
    try:
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True
