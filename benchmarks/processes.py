"""Where a blipq worker's CPU goes, process by process, and the multi-core floor.

``ProcessCpu`` reads utime + stime from ``/proc/<pid>/stat`` for a worker's processes (the
launcher's children too) and for its model thread (the OS thread named ``blipq-model``), so a
run's CPU seconds can be divided by its images. ``FloorMulti`` runs the worker's own S3 GET +
decode + resize (``benchmarks.modes.Floor`` with ``worker_code``) in P processes x T threads,
with no queue: the floor of a machine with several cores.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")
MODEL_THREAD = "blipq-model"


def _stat(path: Path) -> tuple[str, list[str]] | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    head, _, tail = text.rpartition(")")
    return head.partition("(")[2], tail.split()


def cpu_s(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (or one of its threads), in seconds (0 if it is gone)."""
    path = Path(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat")
    stat = _stat(path)
    if stat is None:
        return 0.0
    fields = stat[1]
    return (int(fields[11]) + int(fields[12])) / _TICK


def children(pid: int) -> list[int]:
    """The direct children of a process (by scanning /proc for their parent id)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(entry / "stat")
            if stat is not None and int(stat[1][1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def named_thread(pid: int, name: str) -> int | None:
    """The id of the thread of ``pid`` whose OS name is ``name``."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            if (task / "comm").read_text().strip() == name:
                return int(task.name)
        except OSError:
            continue
    return None


@dataclass
class ProcessCpu:
    """A worker's processes by role, and its model thread, for CPU ms per image."""

    root: int

    def roles(self) -> dict[str, tuple[int, int | None]]:
        """role -> (pid, tid or None): the worker, its model process or thread, its intakes."""
        kids = children(self.root)
        procs = [self.root, *kids]
        roles: dict[str, tuple[int, int | None]] = {}
        intake = 0
        for pid in procs:
            model_thread = named_thread(pid, MODEL_THREAD) is not None
            if kids and pid != self.root and (model_thread or _is_model_process(pid)):
                roles["model_process"] = (pid, None)
            elif pid == self.root and kids:
                roles["launcher"] = (pid, None)
            else:
                roles["worker" if not kids else f"intake_{intake}"] = (pid, None)
                intake += 1 if kids else 0
        for pid in procs:
            tid = named_thread(pid, MODEL_THREAD)
            if tid is not None:
                roles["model_thread"] = (pid, tid)
        return roles

    def snapshot(self) -> dict[str, float]:
        return {role: cpu_s(pid, tid) for role, (pid, tid) in self.roles().items()}


def _is_model_process(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"worker.split.modelproc" in cmdline


def ms_per_image(
    before: dict[str, float], after: dict[str, float], images: int
) -> dict[str, float]:
    """CPU ms per image of every role present at both ends."""
    return {
        role: round((after[role] - before[role]) * 1000 / images, 3)
        for role in after
        if role in before
    }


# --- the floor in several processes ---------------------------------------------------------


@dataclass(frozen=True)
class S3Address:
    """What a floor process needs to build its own S3 client (picklable)."""

    endpoint_url: str
    access_key: str
    secret_key: str

    def client(self, pool: int = 10) -> Any:
        from pydantic import SecretStr

        from producer.protocol.s3 import S3Settings, make_s3_client

        settings = S3Settings(
            s3_endpoint_url=self.endpoint_url,
            s3_access_key_id=self.access_key,
            s3_secret_access_key=SecretStr(self.secret_key),
        )
        return make_s3_client(settings, max_pool=pool)


_floor: Any = None


def _init_floor(address: S3Address, threads: int) -> None:
    global _floor
    from benchmarks.modes import Floor

    _floor = Floor(address, threads, worker_code=True)


def _floor_run(keys: list[str]) -> int:
    return int(_floor.run(keys))


class FloorMulti:
    """The worker's GET + decode + resize in ``processes`` x ``threads``, no queue."""

    name = "floor_multi"

    def __init__(self, address: S3Address, processes: int, threads: int) -> None:
        self.address = address
        self.processes = processes
        self.threads = threads
        self.keys: list[str] = []
        spawn = multiprocessing.get_context("spawn")
        self._pool = ProcessPoolExecutor(
            processes, mp_context=spawn, initializer=_init_floor, initargs=(address, threads)
        )

    def run(self, keys: list[str]) -> int:
        shares = [keys[i :: self.processes] for i in range(self.processes)]
        return sum(self._pool.map(_floor_run, [s for s in shares if s]))

    def warm(self) -> None:
        self.run([self.keys[i % len(self.keys)] for i in range(self.processes * self.threads * 2)])

    @property
    def pids(self) -> list[int]:
        """Its worker processes (started by the first run)."""
        return list(getattr(self._pool, "_processes", None) or {})

    def close(self) -> None:
        self._pool.shutdown()
