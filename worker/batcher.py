"""The dynamic batcher: items from many messages share one forward pass.

Pure Python (no Celery, no torch). Producers of items (worker threads) call ``submit`` and wait
on the returned future; one model thread calls ``serve_forever`` (or a test calls ``poll``).
A group of items is flushed when it holds ``max_size`` items or when its oldest item has waited
``max_wait_s``, or at once when the caller's ``idle(key)`` says no more items for it are on
their way (a lone job at idle does not wait for a batch that cannot fill). While items are on
their way, a group may wait longer than ``max_wait_s`` for them: up to a fraction of its last
forward pass (``BatchPolicy.arriving_wait_fraction``), because when one pass takes a second
(a CPU) a burst whose jobs finish decoding 50 ms apart should share it, and when a pass takes
20 ms (a GPU) it should not wait more than a few ms. Items share a batch
only when they share a key: the caller puts into the key everything that must be equal for one
forward pass to serve them all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

Clock = Callable[[], float]
PASS_HISTORY = 1024  # group keys whose last pass duration is remembered
RunBatch = Callable[[Hashable, list[Any]], Sequence[Any]]


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    max_size: int
    max_wait_s: float
    arriving_wait_fraction: float = 0.0
    """While ``idle(key)`` is False, wait up to this fraction of the key's last pass."""
    max_arriving_wait_s: float = 1.0


class BatchSizeMismatch(RuntimeError):
    """The model returned a different number of outputs than it was given inputs."""


@dataclass(slots=True)
class _Item:
    payload: Any
    future: Future[Any]
    enqueued: float


@dataclass
class _Group:
    items: deque[_Item] = field(default_factory=deque)


class Batcher:
    """Collects items into batches by key; size and deadline triggers; per-item failures."""

    def __init__(
        self,
        run: RunBatch,
        policy: Callable[[Hashable], BatchPolicy],
        *,
        clock: Clock = time.monotonic,
        idle: Callable[[Hashable], bool] | None = None,
    ) -> None:
        self._run_batch = run
        self._policy = policy
        self._now = clock
        self._idle = idle
        self._groups: dict[Hashable, _Group] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batch_sizes: Counter[int] = Counter()
        """How many batches of each size ran (the batch-size histogram)."""
        self._last_pass_s: dict[Hashable, float] = {}

    # --- producer side ---------------------------------------------------------------------------

    def submit(self, key: Hashable, payload: Any) -> Future[Any]:
        """Queue one item; its future resolves to the model's output for it (or its error)."""
        future: Future[Any] = Future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("batcher is stopped")
            group = self._groups.get(key)
            new = group is None
            if group is None:
                group = self._groups[key] = _Group()
            group.items.append(_Item(payload, future, self._now()))
            # Wake the model thread only when this item can change what it does: a new group
            # (a deadline it is not waiting for), a full one, or one nobody is adding to. Else it
            # is running a batch or waiting for this group's deadline, which this item does not
            # move. On a busy worker that spares a thread switch per item (the switch, taken
            # while holding the GIL, was 29 % of the GIL's time under a full queue: py-spy --gil).
            if new or len(group.items) >= self._policy(key).max_size or self._is_idle(key):
                self._cond.notify()
        return future

    def wake(self) -> None:
        """Make the model thread look again (``idle`` may have changed)."""
        with self._cond:
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return sum(len(g.items) for g in self._groups.values())

    # --- model side ------------------------------------------------------------------------------

    def poll(self, *, force: bool = False) -> bool:
        """Run one ready batch if there is one (``force``: the oldest group, ready or not)."""
        with self._cond:
            taken, _ = self._take(force=force)
        if taken is None:
            return False
        self._execute(*taken)
        return True

    def serve_forever(self) -> None:
        """Run batches until ``stop``; then run what is left (nothing submitted is dropped)."""
        if threading.current_thread() is not threading.main_thread():
            name_os_thread(threading.current_thread().name)
        while True:
            with self._cond:
                taken, wait = self._take(force=self._stopping)
                while taken is None:
                    if self._stopping and not self._groups:
                        return
                    self._cond.wait(timeout=wait)
                    taken, wait = self._take(force=self._stopping)
            self._execute(*taken)

    def start(self, name: str = "blipq-model") -> threading.Thread:
        """Start the one thread that owns the model."""
        self._thread = threading.Thread(target=self.serve_forever, name=name, daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting items, run the ones already queued, and join the model thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- internals -------------------------------------------------------------------------------

    def _take(self, *, force: bool) -> tuple[tuple[Hashable, list[_Item]] | None, float | None]:
        """Pop the ready group with the oldest item; else say how long until one is due."""
        now = self._now()
        best: tuple[float, Hashable] | None = None
        next_due: float | None = None
        for key, group in self._groups.items():
            policy = self._policy(key)
            oldest = group.items[0].enqueued
            idle = self._is_idle(key)
            due = oldest + self._wait_s(key, policy, idle)
            full = len(group.items) >= policy.max_size
            if force or full or due <= now or idle:
                if best is None or oldest < best[0]:
                    best = (oldest, key)
            elif next_due is None or due < next_due:
                next_due = due
        if best is None:
            return None, None if next_due is None else max(next_due - now, 0.0)
        key = best[1]
        group = self._groups[key]
        size = self._policy(key).max_size
        items = [group.items.popleft() for _ in range(min(size, len(group.items)))]
        if not group.items:
            del self._groups[key]
        return (key, items), None

    def _is_idle(self, key: Hashable) -> bool:
        return self._idle is not None and self._idle(key)

    def _wait_s(self, key: Hashable, policy: BatchPolicy, idle: bool) -> float:
        """How long the oldest item of a group that is not full may wait for company."""
        if idle or self._idle is None or not policy.arriving_wait_fraction:
            return policy.max_wait_s
        last_pass = self._last_pass_s.get(key, 0.0)
        grace = min(policy.arriving_wait_fraction * last_pass, policy.max_arriving_wait_s)
        return max(policy.max_wait_s, grace)

    def _execute(self, key: Hashable, items: list[_Item]) -> None:
        live = [item for item in items if item.future.set_running_or_notify_cancel()]
        if live:
            self.batch_sizes[len(live)] += 1
            started = self._now()
            self._run_isolated(key, live)
            # Keys hold job options (a prompt): keep the most recent ones, not every one ever.
            self._last_pass_s.pop(key, None)
            self._last_pass_s[key] = self._now() - started
            if len(self._last_pass_s) > PASS_HISTORY:
                del self._last_pass_s[next(iter(self._last_pass_s))]

    def _run_isolated(self, key: Hashable, items: list[_Item]) -> None:
        """Run a batch; if it fails as a whole, split it so a bad item fails alone."""
        try:
            outputs = self._run_batch(key, [item.payload for item in items])
            if len(outputs) != len(items):
                raise BatchSizeMismatch(f"{len(items)} inputs gave {len(outputs)} outputs")
        except Exception as exc:
            if len(items) == 1:
                items[0].future.set_exception(exc)
                return
            log.warning("batch of %d failed (%s); retrying in halves", len(items), exc)
            half = len(items) // 2
            self._run_isolated(key, items[:half])
            self._run_isolated(key, items[half:])
            return
        for item, output in zip(items, outputs, strict=True):
            if isinstance(output, BaseException):
                item.future.set_exception(output)
            else:
                item.future.set_result(output)


def name_os_thread(name: str) -> None:
    """Give the calling thread its name in the OS too (Linux ``comm``, 15 bytes), so that
    ``/proc/<pid>/task/*/comm`` tells the model thread apart (its CPU time is measured)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):  # not Linux: the name is only for measuring
        pass
