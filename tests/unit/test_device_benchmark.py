"""The GPU benchmark's options (benchmarks/device.py), checked where there is no GPU."""

from __future__ import annotations

from benchmarks.device import parse


def test_defaults_measure_both_architectures_and_up_to_15_intake_processes() -> None:
    args = parse([])
    assert args.archs == ["base", "large"] and args.device == "cuda"
    assert args.intake_processes == [1, 2, 4, 8, 15]
    assert args.batch_sizes == [1, 8, 32, 64, 128, 256]
    assert args.budget_s <= 8 * 60


def test_tiny_cpu_check() -> None:
    args = parse(["--tiny", "--device", "cpu", "--archs", "base", "--intake-processes", "1,2"])
    assert args.tiny and args.archs == ["base"] and args.intake_processes == [1, 2]
