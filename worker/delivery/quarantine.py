"""Suspect jobs run alone, so that a poison job's crashes are counted against it alone.

A job whose earlier start did not finish (its worker was killed, or lost its connection, while
the job was in flight) is a suspect: it may be the one that kills workers. Every job in flight in
a process dies with it, though, so if a suspect ran next to other jobs again, each crash it causes
would also count against them, and after ``max_deliveries`` crashes innocent jobs would be
dead-lettered with it (measured with a real poison job before this existed: 1 of 40 jobs
submitted around it). So, within one worker process:

- an ordinary job runs ``shared()``, next to the other ordinary jobs;
- a suspect runs ``alone()``: it waits until the jobs in flight have finished, keeps new ones
  from starting meanwhile (they wait without having been counted as started), and runs with
  nothing else in the process. Suspects run one at a time; ordinary jobs resume after them.

A crash during a suspect's run is then its own; the jobs that merely waited come back after the
visibility timeout as first deliveries. This costs nothing until a worker dies, and afterwards
only while its suspects are being rerun.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Quarantine:
    """A writer-preferring shared/exclusive lock for the jobs of one worker process."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0  # ordinary jobs running
        self._alone = False  # a suspect is running
        self._waiting = 0  # suspects waiting to run alone

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Run next to other ordinary jobs; wait while a suspect runs or waits to run."""
        with self._cond:
            self._cond.wait_for(lambda: not self._alone and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        """Run with no other job in this process (after those in flight have finished)."""
        with self._cond:
            self._waiting += 1
            try:
                self._cond.wait_for(lambda: not self._alone and not self._shared)
            finally:
                self._waiting -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                self._cond.notify_all()

    def state(self) -> tuple[int, bool, int]:
        """(ordinary jobs running, a suspect running, suspects waiting): for tests and logs."""
        with self._cond:
            return self._shared, self._alone, self._waiting
