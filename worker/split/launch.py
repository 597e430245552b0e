"""``blipq-worker [celery worker options]``: one command starts a worker.

With ``BLIPQ_INTAKE_PROCESSES=0`` it becomes ``celery -A worker.celery.app worker`` itself (one
process). ``auto``, the default, is the worker's cores minus one (at least 1) when the models
run on CUDA, and 0 on the CPU (``intake_processes``). With N > 0 it starts the model process
(``worker.split.modelproc``) and N intake processes (``celery -A worker.celery.app worker`` each,
named ``NAME-i@HOST``, reaching the model process through ``BLIPQ_MODEL_SOCKET``) and watches
them: a model process that dies is started again (the intake processes' jobs in it run again,
``worker.split.remote``), an intake process that dies is started again (the broker redelivers
its messages). SIGTERM stops the intake processes first (each drains its jobs, which need the
model process: it is started again if it dies meanwhile), then the model process. Every child
dies with the launcher (``PR_SET_PDEATHSIG``), so a SIGKILL of the launcher ends the whole
worker, as it ends a one-process worker. With ``BLIPQ_METRICS_PORT`` set, the children write
their metrics to a directory of the launcher's (``PROMETHEUS_MULTIPROC_DIR``) and the launcher
serves them all on that one port once the model process is ready
(``worker.metrics.serve_processes``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from worker.metrics import MULTIPROC_DIR_VARIABLE, serve_processes
from worker.settings import Settings

log = logging.getLogger("blipq.launch")
CELERY = ["-m", "celery", "-A", "worker.celery.app", "worker"]
RESTART_PAUSE_S = 1.0


def _die_with_parent() -> None:
    # Not Linux: the children outlive a killed launcher.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def intake_args(args: list[str], index: int) -> list[str]:
    """The Celery options of intake process ``index``: its own node name (``NAME-i@HOST``)."""
    out, named = [], False
    it = iter(args)
    for arg in it:
        for flag in ("--hostname", "-n"):
            if arg == flag:
                out += [flag, _node(next(it, "celery@%h"), index)]
                named = True
                break
            if arg.startswith(flag + "="):
                out.append(f"{flag}={_node(arg.split('=', 1)[1], index)}")
                named = True
                break
        else:
            out.append(arg)
    return out if named else [*out, "--hostname", _node("celery@%h", index)]


def _node(name: str, index: int) -> str:
    base, at, host = name.partition("@")
    return f"{base}-{index}{at}{host}"


def intake_processes(settings: Settings) -> int:
    """How many intake processes to start: ``BLIPQ_INTAKE_PROCESSES``, ``auto`` resolved against
    the placement of the models and the cores this process may run on (its CPU affinity)."""
    if settings.intake_processes != "auto":
        return settings.intake_processes
    return settings.intake_count(cuda=on_cuda(settings.device), cores=worker_cores())


def worker_cores() -> int:
    """The cores this worker may run on: its CPU affinity, capped by a cgroup v2 CPU quota
    (a container's CPU limit: Kubernetes ``limits.cpu``, ``docker --cpus``) where there is one."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = CPU_MAX.read_text().split()[:2]
        limit = math.ceil(int(quota) / int(period))
    except (OSError, ValueError):  # no cgroup v2 file here, or "max": no quota
        return cores
    return max(1, min(cores, limit))


CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
"""The CPU quota of this process's cgroup (v2, as a container sees its own): ``QUOTA PERIOD``."""


def on_cuda(device: str) -> bool:
    """Whether the models will run on CUDA (``BLIPQ_DEVICE``; ``auto``: a CUDA device is there)."""
    if device != "auto":
        return device.startswith("cuda")
    if not _gpu_driver():
        return False  # importing torch (seconds) would say the same
    import torch

    return bool(torch.cuda.is_available())


def _gpu_driver() -> bool:
    """A GPU driver's device file: NVIDIA's ``/dev/nvidiaN``, ROCm's ``/dev/kfd``, WSL's
    ``/dev/dxg``."""
    dev = Path("/dev")
    return any(dev.glob("nvidia[0-9]*")) or (dev / "kfd").exists() or (dev / "dxg").exists()


class Supervisor:
    """The model process and the intake processes of one worker."""

    def __init__(self, settings: Settings, args: list[str], count: int) -> None:
        self.count = count
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="blipq-worker-"))
        self.socket = str(self.dir / "model.sock")
        self.model: subprocess.Popen[bytes] | None = None
        self.intakes: list[subprocess.Popen[bytes] | None] = [None] * self.count
        self.stopping = False
        self.metrics = (settings.metrics_port, settings.metrics_addr)
        self.metrics_dir = self.dir / "metrics"
        self.metrics_dir.mkdir()
        self.serving = False

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, *argv],
            env={**os.environ, **(env or {}), MULTIPROC_DIR_VARIABLE: str(self.metrics_dir)},
            preexec_fn=_die_with_parent,  # noqa: PLW1509
        )

    def start_model(self) -> None:
        Path(self.socket).unlink(missing_ok=True)  # a killed model process leaves its socket
        self.model = self._spawn(["-m", "worker.split.modelproc", self.socket])
        log.warning("blipq-worker: model process %d started", self.model.pid)

    def start_intake(self, index: int) -> None:
        env = {**os.environ, "BLIPQ_MODEL_SOCKET": self.socket, "BLIPQ_INTAKE_PROCESSES": "0"}
        proc = self._spawn([*CELERY, *intake_args(self.args, index)], env)
        self.intakes[index] = proc
        log.warning("blipq-worker: intake process %d (%d) started", index, proc.pid)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self.start_model()
        for index in range(self.count):
            self.start_intake(index)
        try:
            return self._watch()
        finally:
            self._shutdown()

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _watch(self) -> int:
        listening = False
        while not self.stopping:
            time.sleep(0.2)
            assert self.model is not None
            listening = listening or Path(self.socket).exists()
            if listening and not self.serving:
                self._serve_metrics()
            if self.model.poll() is not None:
                if not listening:  # it never got as far as loading its models
                    log.error(
                        "blipq-worker: the model process exited %d at start", self.model.returncode
                    )
                    return 1
                log.error(
                    "blipq-worker: model process exited %d; starting it again",
                    self.model.returncode,
                )
                time.sleep(RESTART_PAUSE_S)
                listening = False
                self.start_model()
            for index, proc in enumerate(self.intakes):
                if proc is not None and proc.poll() is not None and not self.stopping:
                    log.error(
                        "blipq-worker: intake process %d exited %d; starting it again",
                        index,
                        proc.returncode,
                    )
                    time.sleep(RESTART_PAUSE_S)
                    self.start_intake(index)
        return 0

    def _serve_metrics(self) -> None:
        """Every process's metrics on the one port, from when the models are loaded (what a
        startup probe waits for, as on a one-process worker)."""
        self.serving = True
        port, addr = self.metrics
        if port:
            serve_processes(port, addr, str(self.metrics_dir), self.processes)

    def processes(self) -> dict[str, int]:
        """The running children by role: ``model``, ``intake-0``, ..."""
        running = {"model": self.model} | {f"intake-{i}": p for i, p in enumerate(self.intakes)}
        return {role: proc.pid for role, proc in running.items() if proc and proc.poll() is None}

    def _shutdown(self) -> None:
        """Intake processes drain first (their jobs need the model process, started again if it
        dies meanwhile), then the model process."""
        for proc in self.intakes:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        while any(proc is not None and proc.poll() is None for proc in self.intakes):
            if self.model is not None and self.model.poll() is not None:
                log.error(
                    "blipq-worker: model process exited %d while the intake processes drain; "
                    "starting it again",
                    self.model.returncode,
                )
                time.sleep(RESTART_PAUSE_S)
                self.start_model()
            time.sleep(0.1)
        if self.model is not None and self.model.poll() is None:
            self.model.terminate()
            try:
                self.model.wait(60)
            except subprocess.TimeoutExpired:
                self.model.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    settings = Settings()
    count = intake_processes(settings)
    if count == 0:
        os.execv(sys.executable, [sys.executable, *CELERY, *args])
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s: %(levelname)s/launch] %(message)s"
    )
    log.warning(
        "blipq-worker: a model process and %d intake processes (BLIPQ_INTAKE_PROCESSES=%s)",
        count,
        settings.intake_processes,
    )
    return Supervisor(settings, args, count).run()


if __name__ == "__main__":
    sys.exit(main())
