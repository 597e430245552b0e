"""The quarantine lock: ordinary jobs run together, a suspect runs alone (no servers, no sleeps)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from worker.delivery.quarantine import Quarantine


def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


class _Job(threading.Thread):
    """Holds the quarantine (shared or alone) until released; records when it got in."""

    def __init__(self, quarantine: Quarantine, mode: str, order: list[str], name: str) -> None:
        super().__init__(daemon=True)
        self.quarantine, self.mode, self.order, self.label = quarantine, mode, order, name
        self.inside = threading.Event()
        self.release = threading.Event()

    def run(self) -> None:
        hold = self.quarantine.alone if self.mode == "alone" else self.quarantine.shared
        with hold():
            self.order.append(self.label)
            self.inside.set()
            self.release.wait(5)


def test_ordinary_jobs_run_together() -> None:
    q, order = Quarantine(), []
    jobs = [_Job(q, "shared", order, f"j{i}") for i in range(3)]
    for job in jobs:
        job.start()
    for job in jobs:
        assert job.inside.wait(5)
    assert q.state() == (3, False, 0)
    for job in jobs:
        job.release.set()
        job.join(5)
    assert q.state() == (0, False, 0)


def test_a_suspect_waits_for_jobs_in_flight_and_holds_new_ones_back() -> None:
    q, order = Quarantine(), []
    first = _Job(q, "shared", order, "first")
    first.start()
    assert first.inside.wait(5)
    suspect = _Job(q, "alone", order, "suspect")
    suspect.start()
    _until(lambda: q.state() == (1, False, 1))  # waiting for the job in flight
    later = _Job(q, "shared", order, "later")
    later.start()
    assert not later.inside.wait(0.05)  # held back: it has not started, so it is not counted
    first.release.set()
    assert suspect.inside.wait(5)
    assert q.state() == (0, True, 0)  # alone in the process
    assert not later.inside.wait(0.05)
    suspect.release.set()
    assert later.inside.wait(5)
    later.release.set()
    for job in (first, suspect, later):
        job.join(5)
    assert order == ["first", "suspect", "later"]
    assert q.state() == (0, False, 0)


def test_suspects_run_one_at_a_time() -> None:
    q, order = Quarantine(), []
    a, b = _Job(q, "alone", order, "a"), _Job(q, "alone", order, "b")
    a.start()
    assert a.inside.wait(5)
    b.start()
    _until(lambda: q.state() == (0, True, 1))
    assert not b.inside.wait(0.05)
    a.release.set()
    assert b.inside.wait(5)
    b.release.set()
    a.join(5)
    b.join(5)
    assert order == ["a", "b"]


def test_an_exception_releases_the_quarantine() -> None:
    q = Quarantine()
    for hold in (q.shared, q.alone):
        try:
            with hold():
                raise RuntimeError("job failed")
        except RuntimeError:
            pass
        assert q.state() == (0, False, 0)


def test_only_deaths_running_alone_count_toward_poison() -> None:
    from worker.delivery.policy import DeliveryPolicy

    policy = DeliveryPolicy(max_attempts=3, max_deliveries=3, worker="w")
    # 1 unfinished start: the first, in a batch: a suspect. 2-3: one or two deaths alone.
    assert [policy.is_poison(starts) for starts in range(5)] == [False] * 4 + [True]
    result, reason = policy.poison("job-1", {"kind": "caption"}, 4)
    assert result.error is not None and result.error.code == "poison"
    assert "died 3 times running alone" in reason
