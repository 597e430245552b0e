"""blipq-worker's intake processes get node names of their own."""

from __future__ import annotations

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
