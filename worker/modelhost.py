"""The models and the thread that runs them: batching, the OOM back-off, batch metrics.

One ``ModelHost`` per process that owns models: inside the Celery worker (one process, the
default) or in the model process (``worker.modelproc``) that intake processes feed. Callers say
how many jobs per model are being prepared (``preparing``), submit prepared items (``submit``
-> a Future of ``Done``) and ``wake`` the model thread; ``worker.remote.RemoteModel`` offers the
same calls to an intake process.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from worker.batcher import Batcher, BatchPolicy
from worker.metrics import Metrics
from worker.models import ModelRunner
from worker.oom import BatchSizeLimiter
from worker.settings import Settings


@dataclass(frozen=True, slots=True)
class Done:
    output: Any
    batch_size: int
    inference_ms: float

    def __reduce__(self) -> tuple[Any, ...]:
        # A split worker pickles one per item; a slots dataclass's own pickling looks up its
        # fields each time.
        return Done, (self.output, self.batch_size, self.inference_ms)


class ModelPort(Protocol):
    """What the engine needs from whatever runs its models (here, or in the model process)."""

    def preparing(self, model: str, delta: int) -> None:
        """``delta`` more (or fewer) jobs of ``model`` are being fetched and prepared."""

    def submit(self, key: Hashable, item: Any) -> Future[Any]:
        """Queue a prepared item of model ``key[0]``; that ends one of its preparations."""

    def wake(self) -> None: ...

    def start(self) -> None: ...

    def stop(self, timeout: float | None = None) -> None: ...


class ModelHost:
    """Owns the runners and the batcher; runs batches in one model thread."""

    def __init__(
        self, settings: Settings, runners: dict[str, ModelRunner[Any]], metrics: Metrics
    ) -> None:
        self.settings = settings
        self.runners = runners
        self.metrics = metrics
        # Jobs per model between "taken" and "in the batcher" (fetching, decoding, preparing):
        # when there are none, a waiting group cannot grow, so it runs without max_wait_ms.
        self._preparing: Counter[str] = Counter()
        self._preparing_lock = threading.Lock()
        self.oom = BatchSizeLimiter()
        self.batcher = Batcher(self._run_batch, self._policy, idle=self._nothing_preparing)
        self.on_batch: Callable[[list[Any]], None] | None = None
        """Called by the model thread with a batch's items just before it runs them (the model
        process tells intake processes which of their jobs are running)."""

    def preparing(self, model: str, delta: int) -> None:
        with self._preparing_lock:
            self._preparing[model] += delta
            emptied = delta < 0 and self._preparing[model] <= 0
        if emptied:  # its waiting groups cannot grow now: they run without waiting
            self.batcher.wake()

    def submit(self, key: Hashable, item: Any, *, ends: int = 1) -> Future[Any]:
        """Queue a prepared item; it ends ``ends`` preparations of its model (the model
        process counts intake processes that are preparing, not their jobs)."""
        # One call, not a submit and then a preparing(-1): the batcher wakes its thread for
        # the item if nothing more is being prepared.
        if ends:
            with self._preparing_lock:
                self._preparing[key[0]] -= ends  # type: ignore[index]
        return self.batcher.submit(key, item)

    def wake(self) -> None:
        self.batcher.wake()

    def start(self) -> None:
        self.batcher.start()

    def stop(self, timeout: float | None = None) -> None:
        self.batcher.stop(timeout=timeout)

    def _nothing_preparing(self, key: Hashable) -> bool:
        return self._preparing[key[0]] <= 0  # type: ignore[index]

    def _policy(self, key: Hashable) -> BatchPolicy:
        spec = self.runners[key[0]].spec  # type: ignore[index]
        size = spec.max_batch_size or self.settings.max_batch_size
        wait_ms = spec.max_wait_ms if spec.max_wait_ms is not None else self.settings.max_wait_ms
        return BatchPolicy(
            max_size=self.oom.limit(spec.name, size),
            max_wait_s=wait_ms / 1000,
            arriving_wait_fraction=self.settings.arriving_wait_fraction,
        )

    def _run_batch(self, key: Hashable, items: list[Any]) -> Sequence[Done]:
        runner = self.runners[key[0]]  # type: ignore[index]
        if self.on_batch is not None:
            self.on_batch(items)
        started = time.perf_counter()
        outputs = self.oom.run(runner.name, items, runner.run_batch)
        elapsed_s = time.perf_counter() - started
        self.metrics.observe_batch(runner.name, len(items), elapsed_s)
        if runner.placement.device.type == "cuda":
            self.metrics.update_gpu()
        return [Done(output, len(items), elapsed_s * 1000) for output in outputs]
