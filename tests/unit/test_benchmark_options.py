"""The throughput benchmark's options: where every mode runs, and what each decodes."""

from __future__ import annotations

import pytest
import torch

from benchmarks import fixtures
from benchmarks.throughput import parse


def test_auto_placement_is_cuda_in_float16_only_with_a_gpu() -> None:
    expected = ("cuda", "float16") if torch.cuda.is_available() else ("cpu", "float32")
    assert parse(["--quick"]).placement() == expected


@pytest.mark.parametrize(
    ("argv", "placement"),
    [
        (["--device", "cuda"], ("cuda", "float16")),  # the model card's GPU recipe
        (["--device", "cuda:1", "--dtype", "bfloat16"], ("cuda:1", "bfloat16")),
        (["--device", "cpu"], ("cpu", "float32")),
        (["--device", "cpu", "--dtype", "bfloat16"], ("cpu", "bfloat16")),
    ],
)
def test_explicit_placement(argv: list[str], placement: tuple[str, str]) -> None:
    assert parse(argv).placement() == placement


def test_every_mode_decodes_the_same_fixed_length_greedily() -> None:
    kwargs = parse(["--max-new-tokens", "5"]).generate_kwargs
    assert kwargs == {"max_new_tokens": 5, "min_new_tokens": 5, "num_beams": 1, "do_sample": False}


def test_architectures() -> None:
    assert parse([]).arch == "base" and parse(["--arch", "large"]).arch == "large"
    with pytest.raises(SystemExit):
        parse(["--arch", "huge"])
    with pytest.raises(ValueError, match="arch must be one of"):
        fixtures.blip_random("huge")


def test_sim_model_is_ms_per_batch_with_a_batch_size() -> None:
    opts = parse(["--sim-model", "20:32"])
    assert (opts.sim_ms, opts.sim_batch) == (20.0, 32)
    assert opts.sim_capacity == 1600.0
    assert parse(["--sim-model", "12.5"]).sim_batch == 16  # the worker's default batch
    assert parse([]).sim_ms is None


@pytest.mark.parametrize("bad", ["x", "0:8", "20:0", "20:many"])
def test_sim_model_refuses_what_is_not_ms_and_batch(bad: str) -> None:
    with pytest.raises(SystemExit):
        parse(["--sim-model", bad])


def test_sim_and_null_model_are_separate_benchmarks() -> None:
    with pytest.raises(SystemExit):
        parse(["--null-model", "--sim-model", "20"])


def test_floor_multi_sweep() -> None:
    assert parse([]).floor_multi == [(1, 16), (2, 8)]
    assert parse(["--floor-multi", "1x4,3x2"]).floor_multi == [(1, 4), (3, 2)]
    assert parse(["--floor-multi", ""]).floor_multi == []
    with pytest.raises(SystemExit):
        parse(["--floor-multi", "2by8"])


def test_intake_processes_scaling_counts() -> None:
    assert parse([]).intake_processes == []
    assert parse(["--null-model", "--intake-processes", "0,1,2"]).intake_processes == [0, 1, 2]
    with pytest.raises(SystemExit):
        parse(["--intake-processes", "one"])


def test_ray_peers_sweep_actors_threads_and_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import raypeer

    monkeypatch.setattr(raypeer, "available", lambda: True)
    assert parse([]).ray == []
    knobs = parse(["--null-model", "--ray", "1x4x16,2x8x32"]).ray
    assert knobs == [raypeer.RayKnobs(1, 4, 16), raypeer.RayKnobs(2, 8, 32)]
    assert len(parse(["--ray"]).ray) == 3  # the default sweep
    for bad in ("2x4", "0x4x16", "axbxc"):
        with pytest.raises(SystemExit):
            parse(["--ray", bad])


def test_ray_peers_need_the_bench_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import raypeer

    monkeypatch.setattr(raypeer, "available", lambda: False)
    with pytest.raises(SystemExit):
        parse(["--ray"])
    assert "pip install 'blipq[bench]'" in capsys.readouterr().err


def test_worker_intake_processes_of_the_measured_worker() -> None:
    assert parse([]).worker_intake is None
    assert parse(["--worker-intake", "2"]).worker_intake == 2
