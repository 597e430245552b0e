"""The ways of captioning a list of S3 images that the throughput benchmark compares.

Each mode has ``warm()`` (untimed) and ``run(keys) -> images processed``; the benchmark
times ``run`` and interleaves the modes over rounds, so drifting load on a shared machine hits
them all alike.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUCKET = "bench-images"
NULL_INPUT_SIZE = 384


def s3_client(s3_server: Any, pool: int = 10) -> Any:
    return s3_server.client(pool)


class Bare:
    """The model alone on pre-made pixel tensors: no I/O, no preprocessing."""

    name = "bare"

    def __init__(self, model: Any, tensors: list[Any], generate: dict[str, Any]) -> None:
        self.model = model
        # Pre-made where the model is, in its dtype: no copy or cast inside the timed pass.
        self.tensors = [t.to(model.device, model.dtype) for t in tensors]
        self.generate = generate
        self.batch_size = 1
        self.keys: list[str] = []  # unused: bare needs no images, only their count
        self._offset = 0

    def batch(self, size: int) -> float:
        """One forward pass of ``size`` images; returns its seconds."""
        import torch

        pixels = torch.stack(
            [self.tensors[(self._offset + j) % len(self.tensors)] for j in range(size)]
        )
        self._offset += size
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(pixel_values=pixels, **self.generate)
        if pixels.is_cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        # [DEC] + exactly max_new_tokens: every mode decodes the same length.
        assert out.shape == (size, self.generate["max_new_tokens"] + 1), out.shape
        return elapsed

    def warm(self) -> None:
        self.batch(1)

    def run(self, keys: list[str]) -> int:
        batches = math.ceil(len(keys) / self.batch_size)
        for _ in range(batches):
            self.batch(self.batch_size)
        return batches * self.batch_size


class SeedLoop:
    """The model card's loop, per image: S3 get_object, PIL open, processor, generate."""

    name = "seed_loop"

    def __init__(self, processor: Any, model: Any, s3: Any, generate: dict[str, Any]) -> None:
        self.processor = processor
        self.model = model
        self.s3 = s3
        self.generate = generate
        self.keys: list[str] = []

    def one(self, key: str) -> str:
        import torch
        from PIL import Image

        body = self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        image = Image.open(io.BytesIO(body)).convert("RGB")
        # The model card's GPU recipe: inputs .to("cuda", torch.float16) (a no-op on CPU).
        inputs = self.processor(image, return_tensors="pt").to(self.model.device, self.model.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self.generate)
        return str(self.processor.decode(out[0], skip_special_tokens=True))

    def warm(self) -> None:
        self.one(self.keys[0])

    def run(self, keys: list[str]) -> int:
        for key in keys:
            self.one(key)
        return len(keys)


class NaiveWorker:
    """``celery -A benchmarks.naive_app worker --pool solo`` as a subprocess."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = {**os.environ, **env}
        self.log_path = Path(tempfile.mkstemp(prefix="bench-naive-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 600) -> NaiveWorker:
        from benchmarks.naive_app import QUEUE

        args = [
            sys.executable, "-m", "celery", "-A", "benchmarks.naive_app", "worker",
            "--pool", "solo", "--queues", QUEUE,
            "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--hostname", f"bench-naive-{os.getpid()}@%h",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO
            )
        deadline = time.monotonic() + timeout
        while " ready." not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"naive celery worker did not start:\n{tail}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class CeleryNaive:
    """One Celery task per image doing the seed loop's work (solo pool, no batching)."""

    name = "celery_naive"

    def __init__(self, redis_url: str) -> None:
        from celery import Celery

        self.app = Celery("bench-naive-producer", set_as_current=False)
        self.app.conf.update(
            broker_url=redis_url,
            result_backend=redis_url,
            task_serializer="json",
            result_serializer="json",
            accept_content=["json"],
        )
        self.keys: list[str] = []

    def _send(self, key: str) -> Any:
        from benchmarks.naive_app import QUEUE, TASK

        return self.app.send_task(TASK, args=[BUCKET, key], queue=QUEUE)

    def warm(self) -> None:
        self._send(self.keys[0]).get(timeout=600)

    def run(self, keys: list[str]) -> int:
        pending = [self._send(key) for key in keys]
        for result in pending:
            result.get(timeout=3600)
        return len(keys)

    def close(self) -> None:
        self.app.close()


class Blipq:
    """CaptionJobs via ``Client.submit_many`` to a real blipq worker; ``Client.results``.

    ``per_message`` > 1: chunk messages of that many jobs (``producer.protocol.chunks``).
    """

    def __init__(
        self,
        name: str,
        client: Any,
        model: str,
        max_new_tokens: int,
        warm_burst: int = 0,
        per_message: int = 1,
    ) -> None:
        self.name = name
        self.warm_burst = warm_burst
        self.per_message = per_message
        self.client = client
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.batch_sizes: Counter[int] = Counter()
        """Jobs by the size of the batch they ran in (JobResult.batch_size), over all runs."""
        self.keys: list[str] = []

    def job(self, key: str) -> Any:
        from producer import CaptionJob

        n = self.max_new_tokens
        return CaptionJob(
            image=f"s3://{BUCKET}/{key}",
            model=self.model,
            max_new_tokens=n,
            min_new_tokens=n,
            num_beams=1,
        )

    def single(self, key: str) -> tuple[float, Any]:
        """Submit one job and wait for it: (seconds, JobResult)."""
        started = time.perf_counter()
        result = self.client.result(self.client.submit(self.job(key)), timeout=600)
        elapsed = time.perf_counter() - started
        if not result.ok:
            raise RuntimeError(f"job failed: {result.error}")
        return elapsed, result

    def warm(self) -> None:
        self.single(self.keys[0])
        if self.warm_burst:  # open the worker's S3 and Redis connections of every thread
            self.run([self.keys[i % len(self.keys)] for i in range(self.warm_burst)])
            self.batch_sizes.clear()

    def run(self, keys: list[str]) -> int:
        ids = self.client.submit_many([self.job(key) for key in keys], per_message=self.per_message)
        results = list(self.client.results(ids, timeout=3600))
        failed = [r for r in results if not r.ok]
        if failed:
            raise RuntimeError(f"{len(failed)} jobs failed, e.g. {failed[0].error}")
        self.batch_sizes.update(r.batch_size for r in results)
        return len(results)


def worker_reader(s3: Any, threads: int) -> Any:
    """The worker's own S3 reader (its presigned GET, its limits) over ``s3``."""
    from worker.images import Limits
    from worker.settings import Settings
    from worker.storage import ObjectReader

    settings = Settings()  # the worker's limits
    limits = Limits(settings.max_image_bytes, settings.max_image_pixels)
    return ObjectReader(s3, limits, pool_size=max(10, threads))


def worker_pixels(reader: Any, key: str, side: int) -> Any:
    """The worker's GET + decode (JPEG draft) + resize of one image: a uint8 CHW tensor."""
    from PIL import Image

    from producer.protocol.jobs import ImageRef
    from worker import images
    from worker.models.resize import resized_uint8

    data = reader.read(ImageRef(BUCKET, key))
    image = images.decode(data, reader.limits, images.draft_side(side))
    return resized_uint8(image, (side, side), Image.Resampling.BICUBIC)


class Floor:
    """A plain thread pool doing only S3 GET + decode + resize; no queue, nothing else.

    ``worker_code=False``: the obvious code (boto3 get_object, PIL open, PIL resize). True: the
    worker's own code for the same steps (``worker.storage.ObjectReader``, ``worker.images``
    with its JPEG draft, its torch resize), so blipq over it is the cost of the system alone.
    """

    def __init__(self, s3_server: Any, threads: int, *, worker_code: bool = False) -> None:
        self.name = "floor_worker_code" if worker_code else "floor"
        self.s3_server = s3_server
        self.worker_code = worker_code
        self.set_threads(threads)
        self.keys: list[str] = []

    def set_threads(self, threads: int) -> None:
        self.threads = threads
        self.s3 = s3_client(self.s3_server, pool=max(10, threads))
        if self.worker_code:
            self.reader = worker_reader(self.s3, threads)

    def one(self, key: str) -> tuple[int, int]:
        from PIL import Image

        side = NULL_INPUT_SIZE
        if self.worker_code:
            resized = worker_pixels(self.reader, key, side)
            return (int(resized.shape[2]), int(resized.shape[1]))
        else:
            body = self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            image = Image.open(io.BytesIO(body)).convert("RGB")
        return image.resize((side, side), resample=Image.Resampling.BICUBIC).size

    def warm(self) -> None:
        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(self.one, self.keys[: self.threads * 2]))

    def run(self, keys: list[str]) -> int:
        with ThreadPoolExecutor(self.threads) as pool:
            return len(list(pool.map(self.one, keys)))
