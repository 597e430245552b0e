from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from typing import Any

import pytest

from worker.batcher import PASS_HISTORY, Batcher, BatchPolicy, BatchSizeMismatch


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.batches: list[tuple[Hashable, list[Any]]] = []

    def __call__(self, key: Hashable, items: list[Any]) -> Sequence[Any]:
        self.batches.append((key, list(items)))
        return [f"{key}:{item}" for item in items]


def make(max_size: int = 4, max_wait_s: float = 0.01) -> tuple[Batcher, Recorder, FakeClock]:
    clock, run = FakeClock(), Recorder()
    batcher = Batcher(run, lambda key: BatchPolicy(max_size, max_wait_s), clock=clock)
    return batcher, run, clock


def test_flushes_when_full() -> None:
    batcher, run, _ = make(max_size=3)
    futures = [batcher.submit("k", i) for i in range(4)]
    assert batcher.poll()
    assert run.batches == [("k", [0, 1, 2])]
    assert [f.result(0) for f in futures[:3]] == ["k:0", "k:1", "k:2"]
    assert not futures[3].done()
    assert not batcher.poll()  # one item, deadline not reached


def test_flushes_at_the_deadline_of_the_oldest_item() -> None:
    batcher, run, clock = make(max_size=8, max_wait_s=0.010)
    first = batcher.submit("k", "a")
    clock.now += 0.006
    batcher.submit("k", "b")
    assert not batcher.poll()
    clock.now += 0.004  # the oldest has now waited exactly max_wait
    assert batcher.poll()
    assert run.batches == [("k", ["a", "b"])]
    assert first.result(0) == "k:a"


def test_items_share_a_batch_only_with_the_same_key() -> None:
    batcher, run, clock = make(max_size=8)
    for i in range(3):
        batcher.submit("x", i)
        batcher.submit("y", i)
    clock.now += 1
    assert batcher.poll() and batcher.poll()
    assert not batcher.poll()
    assert sorted(run.batches) == [("x", [0, 1, 2]), ("y", [0, 1, 2])]


def test_oldest_group_goes_first() -> None:
    batcher, run, clock = make(max_size=8)
    batcher.submit("late", 1)
    clock.now -= 1  # an earlier enqueue time for the next group
    batcher.submit("early", 1)
    clock.now += 5
    batcher.poll()
    assert run.batches[0][0] == "early"


def test_a_bad_item_fails_alone() -> None:
    def run(key: Hashable, items: list[Any]) -> Sequence[Any]:
        if "bad" in items:
            raise ValueError("cannot run bad")
        return [item.upper() for item in items]

    batcher = Batcher(run, lambda key: BatchPolicy(8, 0.0), clock=FakeClock())
    futures = [batcher.submit("k", item) for item in ["a", "b", "bad", "c", "d"]]
    assert batcher.poll(force=True)
    assert [f.result(0) for i, f in enumerate(futures) if i != 2] == ["A", "B", "C", "D"]
    with pytest.raises(ValueError, match="cannot run bad"):
        futures[2].result(0)


def test_per_item_exceptions_are_delivered_to_their_item() -> None:
    def run(key: Hashable, items: list[Any]) -> Sequence[Any]:
        return [KeyError(i) if i == 1 else i for i in items]

    batcher = Batcher(run, lambda key: BatchPolicy(8, 0.0), clock=FakeClock())
    futures = [batcher.submit("k", i) for i in range(3)]
    batcher.poll(force=True)
    assert futures[0].result(0) == 0 and futures[2].result(0) == 2
    with pytest.raises(KeyError):
        futures[1].result(0)


def test_wrong_number_of_outputs_is_an_error_not_a_silent_shift() -> None:
    batcher = Batcher(
        lambda k, items: items[:-1], lambda key: BatchPolicy(8, 0.0), clock=FakeClock()
    )
    futures = [batcher.submit("k", i) for i in range(3)]
    batcher.poll(force=True)
    # After splitting down to single items, each single item yields zero outputs.
    for future in futures:
        with pytest.raises(BatchSizeMismatch):
            future.result(0)


def test_batch_size_histogram() -> None:
    batcher, _, clock = make(max_size=2)
    for i in range(5):
        batcher.submit("k", i)
    clock.now += 1
    while batcher.poll():
        pass
    assert batcher.batch_sizes == {2: 2, 1: 1}


def test_model_thread_drains_on_stop_without_sleeping() -> None:
    batcher, _, _ = make(max_size=100, max_wait_s=3600)  # only stop() can flush these
    thread = batcher.start()
    futures = [batcher.submit("k", i) for i in range(5)]
    batcher.stop(timeout=10)
    assert not thread.is_alive()
    assert [f.result(0) for f in futures] == [f"k:{i}" for i in range(5)]
    with pytest.raises(RuntimeError, match="stopped"):
        batcher.submit("k", 9)


def test_model_thread_serves_concurrent_submitters() -> None:
    batcher = Batcher(lambda k, items: [i * 2 for i in items], lambda key: BatchPolicy(4, 0.001))
    batcher.start()
    results: dict[int, int] = {}

    def submit(start: int) -> None:
        for i in range(start, start + 25):
            results[i] = batcher.submit("k", i).result(10)

    threads = [threading.Thread(target=submit, args=(n * 25,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.stop(timeout=10)
    assert results == {i: i * 2 for i in range(100)}


class Arrivals:
    """The ``idle`` callback: how many items are still on their way (being prepared)."""

    def __init__(self) -> None:
        self.coming = 0

    def __call__(self, key: Hashable) -> bool:
        return self.coming == 0


def make_arriving(fraction: float = 0.25) -> tuple[Batcher, Recorder, FakeClock, Arrivals]:
    clock, arrivals = FakeClock(), Arrivals()

    def run(key: Hashable, items: list[Any]) -> Sequence[Any]:
        recorder.batches.append((key, list(items)))
        clock.now += 1.0 * len(items)  # a CPU-like pass: one second per item
        return [f"{key}:{item}" for item in items]

    recorder = Recorder()
    policy = BatchPolicy(8, 0.010, arriving_wait_fraction=fraction)
    batcher = Batcher(run, lambda key: policy, clock=clock, idle=arrivals)
    return batcher, recorder, clock, arrivals


def test_a_slow_model_waits_for_items_on_their_way_a_fraction_of_its_last_pass() -> None:
    batcher, run, clock, arrivals = make_arriving()
    batcher.submit("k", "warm")
    assert batcher.poll()  # nothing on its way: runs at once; the pass took 1 s
    arrivals.coming = 3
    batcher.submit("k", "a")
    clock.now += 0.05  # well past max_wait (10 ms), but 3 more are being prepared
    assert not batcher.poll()
    arrivals.coming = 2
    batcher.submit("k", "b")
    clock.now += 0.2  # 0.25 s since "a": a quarter of the last pass
    assert batcher.poll()
    assert run.batches[-1] == ("k", ["a", "b"])


def test_items_on_their_way_stop_being_waited_for_once_none_are_coming() -> None:
    batcher, run, clock, arrivals = make_arriving()
    batcher.submit("k", "warm")
    batcher.poll()
    arrivals.coming = 1
    batcher.submit("k", "a")
    clock.now += 0.05
    assert not batcher.poll()
    arrivals.coming = 0  # the last one failed to decode: nothing more is coming
    assert batcher.poll()
    assert run.batches[-1] == ("k", ["a"])


def test_without_a_pass_on_record_or_with_fraction_zero_max_wait_applies() -> None:
    for fraction, warm in ((0.25, False), (0.0, True)):
        batcher, run, clock, arrivals = make_arriving(fraction)
        if warm:
            batcher.submit("k", "warm")
            batcher.poll()
        arrivals.coming = 5
        batcher.submit("k", "a")
        clock.now += 0.010
        assert batcher.poll(), (fraction, warm)
        assert run.batches[-1] == ("k", ["a"])


def test_the_extra_wait_is_capped() -> None:
    batcher, _, clock, arrivals = make_arriving(fraction=1.0)
    for i in range(8):
        batcher.submit("k", i)
    batcher.poll()  # a full batch: an 8 s pass on record
    arrivals.coming = 1
    batcher.submit("k", "a")
    clock.now += 0.99
    assert not batcher.poll()
    clock.now += 0.01  # max_arriving_wait_s (1 s), not 8 s
    assert batcher.poll()


def test_pass_history_is_bounded_and_keeps_the_recent_keys() -> None:
    batcher = make_arriving()[0]
    for i in range(PASS_HISTORY + 50):  # e.g. a new prompt in every job
        batcher.submit(("m", f"prompt {i}"), i)
        batcher.poll()
    history = batcher._last_pass_s
    assert len(history) == PASS_HISTORY
    assert ("m", "prompt 0") not in history and ("m", f"prompt {PASS_HISTORY + 49}") in history
