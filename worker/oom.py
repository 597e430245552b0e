"""Out-of-memory back-off: a batch that does not fit is split, and the size that fits is kept.

When a forward pass raises CUDA out-of-memory, the limiter lowers that model's batch size to
half the failed batch (never below 1), frees the allocator's cache, and re-raises: the batcher
then retries the batch in halves (``Batcher._run_isolated``), so no job is lost, and later
batches are taken at the remembered size. Pure logic apart from ``torch.cuda.empty_cache``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA (or MPS) out of memory, whatever exception class this torch build raises for it."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class BatchSizeLimiter:
    """The largest batch size per model known to fit (absent: the configured size)."""

    def __init__(self, free_cache: Callable[[], None] = _free_cache) -> None:
        self._safe: dict[str, int] = {}
        self._lock = threading.Lock()
        self._free_cache = free_cache

    def limit(self, model: str, configured: int) -> int:
        with self._lock:
            return min(configured, self._safe.get(model, configured))

    def safe_sizes(self) -> dict[str, int]:
        with self._lock:
            return dict(self._safe)

    def run(self, model: str, items: list[Any], run: Callable[[list[Any]], Sequence[Any]]) -> Any:
        """``run(items)``; on out-of-memory, remember a smaller size and re-raise."""
        try:
            return run(items)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            size = max(1, len(items) // 2)
            with self._lock:
                self._safe[model] = min(size, self._safe.get(model, size))
            self._free_cache()
            log.warning(
                "model %s: out of memory on a batch of %d; batches of at most %d from now on",
                model,
                len(items),
                self._safe[model],
            )
            raise
