"""SDPA vision attention (worker.models.attention) gives the eager model's outputs.

The trained shapes-world models (real BLIP architectures with learned weights) run held-out
images both ways through the worker's runner classes: the same captions, the same answers,
matching scores and vision features within float tolerance.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.models.blip.modeling_blip import BlipAttention

from producer.protocol.jobs import CaptionJob, MatchJob, VqaJob
from tests.fixtures.shapes import world
from worker.models.attention import SdpaBlipAttention, use_eager_attention, use_sdpa_attention
from worker.models.base import ModelRunner, Placement
from worker.models.registry import load_runner
from worker.settings import ModelSpec

MODELS = Path(__file__).resolve().parents[1] / "fixtures" / "models"
CPU = Placement(torch.device("cpu"), torch.float32)
SEED = 9_000_777  # a held-out dataset seed training never used
N = 24
URI = "s3://shapes/x.png"

pytestmark = pytest.mark.usefixtures("at_most_two_torch_threads")


def load(name: str, family: str, *, sdpa: bool = True) -> ModelRunner[Any]:
    spec = ModelSpec(name=name, source=str(MODELS / name), family=family)  # type: ignore[arg-type]
    return load_runner(spec, CPU, warmup=False, sdpa=sdpa)


def both_ways(runner: ModelRunner[Any], jobs: list[tuple[Any, Any]]) -> tuple[list[Any], ...]:
    """The runner's outputs for the jobs, batched by group key: eager attention, then SDPA."""
    groups: dict[Any, list[Any]] = defaultdict(list)
    for job, image in jobs:
        item = runner.prepare(job, image)
        groups[runner.group_key(item)].append(item)
    model = runner.model  # type: ignore[attr-defined]
    outputs = []
    for swap in (use_eager_attention, use_sdpa_attention):
        assert swap(model) > 0
        outputs.append([o.output for items in groups.values() for o in runner.run_batch(items)])
    return tuple(outputs)


def scenes() -> list[tuple[world.Scene, Any]]:
    return [(s.scene, s.decode()) for s in world.dataset(SEED, N)]


def test_the_worker_loads_blip_with_sdpa_by_default_and_per_model() -> None:
    fast = load("shapes-caption", "caption")
    eager = load("shapes-caption", "caption", sdpa=False)
    kinds = {type(m) for m in fast.model.modules() if isinstance(m, BlipAttention)}  # type: ignore[attr-defined]
    assert kinds == {SdpaBlipAttention}
    # The swap changes one loaded model, not the class every BLIP model in the process uses.
    kinds = {type(m) for m in eager.model.modules() if isinstance(m, BlipAttention)}  # type: ignore[attr-defined]
    assert kinds == {BlipAttention}


def test_vision_features_and_attention_weights() -> None:
    runner = load("shapes-caption", "caption")
    model = runner.model  # type: ignore[attr-defined]
    pixels = torch.stack(
        [runner.prepare(CaptionJob(image=URI), i).pixel_values for _, i in scenes()]
    )
    with torch.inference_mode():
        use_eager_attention(model)
        eager = model.vision_model(pixel_values=pixels, output_attentions=True)
        use_sdpa_attention(model)
        fast = model.vision_model(pixel_values=pixels).last_hidden_state
        # Asked for attention weights (which SDPA never forms), it falls back to eager.
        asked = model.vision_model(pixel_values=pixels, output_attentions=True)
    scale = eager.last_hidden_state.abs().max().item()
    assert scale > 1  # a trained model: features of real magnitude, not random-init noise
    assert (fast - eager.last_hidden_state).abs().max().item() <= 1e-4 * scale
    assert (
        len(asked.attentions)
        == len(eager.attentions)
        == model.config.vision_config.num_hidden_layers
    )
    assert torch.equal(asked.attentions[0], eager.attentions[0])


def test_same_captions() -> None:
    runner = load("shapes-caption", "caption")
    eager, sdpa = both_ways(
        runner, [(CaptionJob(image=URI, model=runner.name), i) for _, i in scenes()]
    )
    assert [o.caption for o in sdpa] == [o.caption for o in eager]


def test_same_vqa_answers() -> None:
    runner = load("shapes-vqa", "vqa")
    jobs = [
        (VqaJob(image=URI, model=runner.name, question=question), image)
        for scene, image in scenes()
        for question, _ in world.vqa_pairs(scene)[:2]
    ]
    eager, sdpa = both_ways(runner, jobs)
    assert [o.answer for o in sdpa] == [o.answer for o in eager]


def test_same_matching_scores() -> None:
    runner = load("shapes-match", "match")
    jobs = [
        (
            MatchJob(
                image=URI,
                model=runner.name,
                texts=[world.caption(scene), *world.negative_captions(scene)],
            ),
            image,
        )
        for scene, image in scenes()
    ]
    eager, sdpa = both_ways(runner, jobs)
    for a, b in zip(eager, sdpa, strict=True):
        for x, y in zip(a.scores, b.scores, strict=True):
            assert x.itm == pytest.approx(y.itm, abs=1e-4)
            assert x.itc == pytest.approx(y.itc, abs=1e-4)
