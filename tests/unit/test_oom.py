"""Out-of-memory back-off through the real batcher: no job lost, the size that fits is kept."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import pytest
import torch

from worker.batcher import Batcher, BatchPolicy
from worker.oom import BatchSizeLimiter, is_out_of_memory

FITS = 3  # batches larger than this "do not fit in memory"


def test_out_of_memory_is_recognised_whatever_the_class() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not a runtime failure


def test_a_batch_that_does_not_fit_is_split_and_the_fitting_size_remembered() -> None:
    freed: list[int] = []
    limiter = BatchSizeLimiter(free_cache=lambda: freed.append(1))
    attempts: list[int] = []

    def forward(items: list[Any]) -> Sequence[Any]:
        attempts.append(len(items))
        if len(items) > FITS:
            raise torch.OutOfMemoryError(f"CUDA out of memory on {len(items)}")
        return [item * 10 for item in items]

    def run(key: Hashable, items: list[Any]) -> Sequence[Any]:
        return limiter.run("blip", items, forward)  # type: ignore[no-any-return]

    batcher = Batcher(run, lambda key: BatchPolicy(limiter.limit("blip", 16), max_wait_s=60))
    first = [batcher.submit("k", i) for i in range(16)]
    while batcher.poll(force=True):
        pass
    assert [f.result(timeout=0) for f in first] == [i * 10 for i in range(16)]
    assert attempts[:3] == [16, 8, 4]  # halves until a batch fits
    assert limiter.safe_sizes() == {"blip": 2}  # half of the smallest batch that failed
    assert freed and len(freed) == sum(1 for a in attempts if a > FITS)

    attempts.clear()
    later = [batcher.submit("k", i) for i in range(6)]
    while batcher.poll(force=True):
        pass
    assert [f.result(timeout=0) for f in later] == [i * 10 for i in range(6)]
    assert attempts == [2, 2, 2]  # taken at the remembered size: no failure, no retry


def test_a_single_item_that_does_not_fit_fails_alone_and_other_errors_pass_through() -> None:
    limiter = BatchSizeLimiter(free_cache=lambda: None)

    def forward(items: list[Any]) -> Sequence[Any]:
        if "huge" in items:
            raise torch.OutOfMemoryError("CUDA out of memory")
        if "bad" in items:
            raise ValueError("bad input")
        return items

    with pytest.raises(torch.OutOfMemoryError):
        limiter.run("m", ["huge"], forward)
    assert limiter.safe_sizes() == {"m": 1}
    with pytest.raises(ValueError):
        limiter.run("other", ["bad", "ok"], forward)
    assert "other" not in limiter.safe_sizes()  # only memory failures lower the size
    assert limiter.limit("other", 8) == 8 and limiter.limit("m", 8) == 1
