"""The prepare side of a runner (``load_prepare``: processor, tokenizer, config, limits) holds no
model: it is what an intake process of a split worker loads, and it prepares every job exactly
as the whole runner does."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from producer import CaptionJob, MatchJob, ModerationJob, VqaJob
from producer.protocol.errors import JobFailure
from tests.fixtures.images import sample_jpegs
from worker.models.base import ModelRunner, Placement
from worker.models.registry import runner_class
from worker.settings import ModelSpec, Settings

CPU = Placement(torch.device("cpu"), torch.float32)
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MODELS = {
    "shapes-caption": "caption",
    "shapes-vqa": "vqa",
    "shapes-match": "match",
    "shapes-blip2-opt": "blip2",
    "shapes-blip2-t5": "blip2",
}
IMAGE = "s3://bkt/a.jpg"
SETTINGS = Settings(
    serve=list(MODELS),
    policies={"shapes": str(FIXTURES / "policies" / "shapes.yaml")},
    caption_scorer="shapes-match",
)


def _jobs(name: str) -> list[Any]:
    family = MODELS[name]
    if family == "caption":
        return [
            CaptionJob(image=IMAGE, model=name),
            CaptionJob(image=IMAGE, model=name, prompt="a picture of"),
            CaptionJob(image=IMAGE, model=name, candidates=2),  # the ITM scorer's pixels too
        ]
    if family == "vqa":
        return [VqaJob(image=IMAGE, model=name, question="what color is the circle?")]
    if family == "match":
        return [
            MatchJob(image=IMAGE, model=name, texts=["a red circle", "a blue square"]),
            ModerationJob(image=IMAGE, model=name, policy="shapes"),
        ]
    return [
        CaptionJob(image=IMAGE, model=name),
        CaptionJob(image=IMAGE, model=name, prompt="a picture of"),
        VqaJob(image=IMAGE, model=name, question="what is it?", history=[("and?", "a circle")]),
    ]


def _runners(*, whole: bool) -> dict[str, ModelRunner[Any]]:
    runners: dict[str, ModelRunner[Any]] = {}
    for name, family in MODELS.items():
        runner = runner_class(family)(
            ModelSpec(name=name, source=str(FIXTURES / "models" / name), family=family),  # type: ignore[arg-type]
            CPU,
        )
        runner.load() if whole else runner.load_prepare()
        runners[name] = runner
    for runner in runners.values():
        runner.bind(runners, SETTINGS)
    return runners


def _modules(value: Any, depth: int = 0) -> list[str]:
    """torch Modules and tensors that need grad reachable from ``value``'s attributes."""
    found: list[str] = []
    if isinstance(value, torch.nn.Module) or (
        isinstance(value, torch.Tensor) and value.requires_grad
    ):
        return [type(value).__name__]
    if depth > 3:
        return found
    children: list[Any] = []
    if isinstance(value, dict):
        children = list(value.values())
    elif isinstance(value, list | tuple):
        children = list(value)
    elif isinstance(value, ModelRunner):
        children = list(vars(value).values())
    for child in children:
        found += _modules(child, depth + 1)
    return found


def _image() -> Image.Image:
    return Image.open(io.BytesIO(sample_jpegs(1, seed=7)[0])).convert("RGB")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(
            _same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__
        )
    return bool(a == b)


@pytest.fixture(scope="module")
def prepare_side() -> dict[str, ModelRunner[Any]]:
    return _runners(whole=False)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_prepare_side_holds_no_model(
    prepare_side: dict[str, ModelRunner[Any]], name: str
) -> None:
    runner = prepare_side[name]
    assert getattr(runner, "model", None) is None
    assert _modules(runner) == []
    assert runner.input_side()  # the image processor is there (draft decoding needs its size)


def test_prepared_items_equal_the_whole_runners(
    prepare_side: dict[str, ModelRunner[Any]],
) -> None:
    whole = _runners(whole=True)
    image = _image()
    for name in MODELS:
        for job in _jobs(name):
            light = prepare_side[name].prepare(job, image)
            full = whole[name].prepare(job, image)
            assert _same(light, full), (name, job)
            assert prepare_side[name].group_key(light) == whole[name].group_key(full)


def test_the_prepare_side_refuses_what_the_model_would(
    prepare_side: dict[str, ModelRunner[Any]],
) -> None:
    """Token limits come from the config: checked in the intake process, before batching."""
    refused = [
        ("shapes-vqa", VqaJob(image=IMAGE, model="shapes-vqa", question="why " * 100)),
        ("shapes-match", ModerationJob(image=IMAGE, model="shapes-match", policy="nope")),
        ("shapes-blip2-opt", CaptionJob(image=IMAGE, model="shapes-blip2-opt", prompt="a " * 240)),
        ("shapes-caption", CaptionJob(image=IMAGE, model="shapes-caption", max_new_tokens=100)),
    ]
    for name, job in refused:
        with pytest.raises(JobFailure) as info:
            prepare_side[name].prepare(job, _image())
        assert info.value.code == "invalid_job", (name, info.value.message)


def test_an_intake_process_loads_no_weights(tmp_path: Path) -> None:
    """In a fresh interpreter, as an intake process starts: after ``load_runners(intake=True)``
    no model exists and no parameter at all (transformers' activation modules, built at its
    import, have none)."""
    models = {
        name: {"source": str(FIXTURES / "models" / name), "family": family}
        for name, family in MODELS.items()
    }
    script = (
        "import gc, sys, torch\n"
        "from worker.engine import load_runners\n"
        "from worker.settings import Settings\n"
        "runners, _ = load_runners(Settings(), intake=True)\n"
        "from transformers import PreTrainedModel\n"
        "modules = [o for o in gc.get_objects() if isinstance(o, torch.nn.Module)]\n"
        "models = [m for m in modules if isinstance(m, PreTrainedModel)]\n"
        "params = sum(p.numel() for m in modules for p in m.parameters())\n"
        "print(len(runners), len(models), params)\n"
    )
    env = {
        "BLIPQ_MODELS": json.dumps(models),
        "BLIPQ_SERVE": ",".join(MODELS),
        "BLIPQ_CAPTION_SCORER": "shapes-match",
        "BLIPQ_POLICIES": json.dumps({"shapes": str(FIXTURES / "policies" / "shapes.yaml")}),
        "HF_HUB_OFFLINE": "1",
    }
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(__file__).resolve().parents[2],
        check=True,
    ).stdout.split()
    assert out == [str(len(MODELS)), "0", "0"]
