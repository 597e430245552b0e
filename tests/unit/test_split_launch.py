"""blipq-worker: how many intake processes it starts, and their node names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.settings import Settings
from worker.split import launch
from worker.split.launch import intake_args


def test_each_intake_process_gets_its_own_node_name() -> None:
    args = ["--loglevel", "INFO", "--hostname", "blipq-1@%h", "--without-gossip"]
    assert intake_args(args, 0) == [
        "--loglevel",
        "INFO",
        "--hostname",
        "blipq-1-0@%h",
        "--without-gossip",
    ]
    assert intake_args(["-n=w@h"], 2) == ["-n=w-2@h"]
    assert intake_args([], 1) == ["--hostname", "celery-1@%h"]


@pytest.mark.parametrize(
    ("value", "cuda", "cores", "expected"),
    [
        ("auto", True, 16, 15),
        ("auto", True, 2, 1),
        ("auto", True, 1, 1),
        ("auto", False, 16, 0),
        ("0", True, 16, 0),
        ("3", False, 2, 3),
    ],
)
def test_intake_processes_auto_is_cores_minus_one_on_cuda_and_none_on_cpu(
    value: str, cuda: bool, cores: int, expected: int
) -> None:
    settings = Settings(intake_processes=value)
    assert settings.intake_count(cuda=cuda, cores=cores) == expected


def test_intake_processes_defaults_to_auto_and_refuses_other_words() -> None:
    assert Settings().intake_processes == "auto"
    assert Settings(intake_processes="2").intake_processes == 2
    for bad in ("-1", "257", "all"):
        with pytest.raises(ValidationError):
            Settings(intake_processes=bad)


def test_the_launcher_resolves_auto_by_placement_and_cpu_affinity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(launch, "CPU_MAX", Path("/nonexistent/cpu.max"))
    assert launch.intake_processes(Settings(device="cuda:1")) == 3
    assert launch.intake_processes(Settings(device="cpu")) == 0
    assert launch.intake_processes(Settings(device="cpu", intake_processes="2")) == 2
    monkeypatch.setattr(launch, "_gpu_driver", lambda: False)
    assert launch.intake_processes(Settings(device="auto")) == 0  # without importing torch
    assert launch.on_cuda("cuda") and not launch.on_cuda("cpu")


def test_a_cgroup_cpu_limit_caps_the_cores(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: set(range(64)))
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(launch, "CPU_MAX", cpu_max)
    assert launch.worker_cores() == 64  # no file: no quota
    cpu_max.write_text("max 100000\n")
    assert launch.worker_cores() == 64
    cpu_max.write_text("400000 100000\n")  # limits.cpu: "4"
    assert launch.worker_cores() == 4
    assert launch.intake_processes(Settings(device="cuda")) == 3
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs
    assert launch.worker_cores() == 2


def test_a_model_process_that_dies_while_the_intake_processes_drain_is_started_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The intake processes' held jobs need the model process to finish: SIGTERM stops them
    first and keeps a model process running until they have exited."""

    def spawn(code: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", code])

    monkeypatch.setattr(launch, "RESTART_PAUSE_S", 0.0)
    supervisor = launch.Supervisor(Settings(), [], 1)
    started: list[subprocess.Popen[bytes]] = []

    def start_model() -> None:
        supervisor.model = spawn("import time; time.sleep(60)")
        started.append(supervisor.model)

    supervisor.start_model = start_model  # type: ignore[method-assign]
    supervisor.model = spawn("pass")  # died just now
    supervisor.model.wait()
    # An intake process that takes a second to drain after SIGTERM.
    intake = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(1)",
        ],
        stdout=subprocess.PIPE,
    )
    assert intake.stdout is not None and intake.stdout.readline() == b"ready\n"
    supervisor.intakes = [intake]
    supervisor._shutdown()
    assert len(started) == 1  # started again once, then stopped after the intake process
    assert started[0].returncode is not None
    intake.stdout.close()
