"""The shapes-world fixture models give the RIGHT answers on images training never saw.

Images come from dataset seeds training never used, are encoded to JPEG/PNG bytes and decoded
back, then go through the worker's own runner classes (``CaptionRunner``, ``VqaRunner``,
``MatchRunner``): the saved processor, batching and ``generate`` exactly as a worker runs them.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from PIL import Image

from producer.protocol.jobs import (
    CaptionJob,
    CaptionOutput,
    MatchJob,
    MatchOutput,
    VqaJob,
    VqaOutput,
)
from tests.fixtures.shapes import world
from worker.models.base import ModelRunner, Placement
from worker.models.blip_caption import CaptionRunner
from worker.models.blip_match import MatchRunner
from worker.models.blip_vqa import VqaRunner
from worker.settings import ModelSpec

pytestmark = [
    pytest.mark.slow,  # about 3 minutes of CPU on 2 cores
    pytest.mark.usefixtures("at_most_two_torch_threads"),
]

MODELS = Path(__file__).resolve().parents[1] / "fixtures" / "models"
CAPTION_SEED = 9_000_001
VQA_SEED = 9_000_002
MATCH_SEED = 9_000_003
BEST_OF_K_SEED = 9_000_004
N_IMAGES = 300
BATCH = 32
CPU = Placement(torch.device("cpu"), torch.float32)


T = TypeVar("T")
R = TypeVar("R", bound=ModelRunner[Any])


def heldout(seed: int) -> list[tuple[world.Scene, Image.Image]]:
    return [(s.scene, s.decode()) for s in world.dataset(seed, N_IMAGES)]


def load(cls: type[R], name: str, family: str) -> R:
    runner = cls(ModelSpec(name=name, source=str(MODELS / name), family=family), CPU)  # type: ignore[arg-type]
    runner.load()
    return runner


def run(runner: ModelRunner[Any], jobs: Sequence[tuple[Any, Image.Image]]) -> list[Any]:
    """Outputs in job order; items batched by the runner's group key, as the worker does."""
    items = [runner.prepare(job, image) for job, image in jobs]
    groups: dict[Any, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[runner.group_key(item)].append(index)
    outputs: list[Any] = [None] * len(items)
    for indices in groups.values():
        for chunk in chunks(indices):
            for index, result in zip(
                chunk, runner.run_batch([items[i] for i in chunk]), strict=True
            ):
                outputs[index] = result.output
    return outputs


def chunks(items: Sequence[T], size: int = BATCH) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def test_captions_exact_match() -> None:
    runner = load(CaptionRunner, "shapes-caption", "caption")
    data = heldout(CAPTION_SEED)
    jobs = [(CaptionJob(image="s3://shapes/x.png", model=runner.name), image) for _, image in data]
    outputs: list[CaptionOutput] = run(runner, jobs)
    wrong = [
        (world.caption(scene), out.caption)
        for (scene, _), out in zip(data, outputs, strict=True)
        if out.caption != world.caption(scene)
    ]
    accuracy = 1 - len(wrong) / len(data)
    print(f"caption exact match {accuracy:.3f}")
    assert accuracy >= 0.98, f"caption exact match {accuracy:.3f}; e.g. {wrong[:5]}"


def question_family(question: str) -> str:
    if question.startswith("is there"):
        return "exists"
    return question.split()[1]  # many / color / shape


def questions(scene: world.Scene, rng: random.Random) -> list[tuple[str, str]]:
    """Every non-existence question, every 'yes' and as many one-attribute-off 'no's."""
    pairs = world.vqa_pairs(scene)
    asked = [p for p in pairs if question_family(p[0]) != "exists" or p[1] == "yes"]
    present = {(s.colour, s.form) for s in scene.shapes}
    near_misses = sorted({v for s in scene.shapes for v in world.variants(s)} - present)
    picked = rng.sample(near_misses, len(scene.shapes))
    return asked + [(f"is there a {c} {f}?", "no") for c, f in picked]


def test_vqa_answers() -> None:
    runner = load(VqaRunner, "shapes-vqa", "vqa")
    rng = random.Random(VQA_SEED)
    asked = [(image, q, a) for scene, image in heldout(VQA_SEED) for q, a in questions(scene, rng)]
    uri = "s3://shapes/x.png"
    jobs = [(VqaJob(image=uri, model=runner.name, question=q), i) for i, q, _ in asked]
    outputs: list[VqaOutput] = run(runner, jobs)
    results: dict[str, list[bool]] = {}
    wrong = []
    for (_, q, a), out in zip(asked, outputs, strict=True):
        results.setdefault(question_family(q), []).append(out.answer == a)
        wrong += [] if out.answer == a else [(q, a, out.answer)]
    overall = 1 - len(wrong) / len(asked)
    per_family = {family: round(sum(v) / len(v), 3) for family, v in results.items()}
    print(f"VQA accuracy {overall:.3f} {per_family}")
    assert overall >= 0.95, f"VQA accuracy {overall:.3f} {per_family}; e.g. {wrong[:5]}"
    assert min(per_family.values()) >= 0.90, per_family


def test_matching_ranks_true_caption_first() -> None:
    runner = load(MatchRunner, "shapes-match", "match")
    data = heldout(MATCH_SEED)
    jobs = [
        (
            MatchJob(
                image="s3://shapes/x.png",
                model=runner.name,
                texts=[world.caption(scene), *world.negative_captions(scene)],
            ),
            image,
        )
        for scene, image in data
    ]
    outputs: list[MatchOutput] = run(runner, jobs)
    wins = {"itm": 0, "itc": 0}
    for out in outputs:
        itm = [score.itm for score in out.scores]
        itc = [score.itc for score in out.scores]
        wins["itm"] += itm[0] > max(itm[1:])
        wins["itc"] += itc[0] > max(itc[1:])
    rates = {name: count / len(data) for name, count in wins.items()}
    print(f"matching rank-1 {rates}")
    assert min(rates.values()) >= 0.95, rates


def test_best_of_k_puts_the_true_caption_first() -> None:
    """CapFilt: the beam caption plus nucleus samples, scored by the shapes ITM model."""
    from worker.settings import Settings

    caption = load(CaptionRunner, "shapes-caption", "caption")
    scorer = load(MatchRunner, "shapes-match", "match")
    peers: dict[str, Any] = {caption.name: caption, scorer.name: scorer}
    for runner in peers.values():
        runner.bind(peers, Settings(serve=["shapes-caption"], caption_scorer=scorer.name))
    torch.manual_seed(0)  # nucleus sampling draws from torch's generator
    data = heldout(BEST_OF_K_SEED)[:120]
    jobs = [
        (CaptionJob(image="s3://shapes/x.png", model=caption.name, candidates=4), image)
        for _, image in data
    ]
    outputs: list[CaptionOutput] = run(caption, jobs)
    wrong = []
    for (scene, _), out in zip(data, outputs, strict=True):
        assert out.candidates, "best-of-k returned no candidates"
        if out.candidates[0].caption != world.caption(scene):
            wrong.append((world.caption(scene), [c.caption for c in out.candidates]))
    rate = 1 - len(wrong) / len(data)
    print(f"best-of-k true caption first {rate:.3f}")
    assert rate >= 0.95, f"true caption first on {rate:.3f}; e.g. {wrong[:3]}"


def test_saved_processors_and_generation() -> None:
    """Each folder loads like a hub checkpoint; greedy captioning stops on [SEP]."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    for name in ("shapes-caption", "shapes-vqa", "shapes-match"):
        processor = BlipProcessor.from_pretrained(MODELS / name)
        assert processor.image_processor.resample == 2  # bilinear
        assert len(processor.tokenizer) == len(world.VOCAB) + 7
    model = BlipForConditionalGeneration.from_pretrained(MODELS / "shapes-caption")
    assert model.config.text_config.bos_token_id == processor.tokenizer.convert_tokens_to_ids(
        "[DEC]"
    )
    assert model.config.text_config.sep_token_id == processor.tokenizer.sep_token_id


def test_a_red_circle_through_the_worker_runner() -> None:
    """The simplest picture: greedy decoding from [DEC] stops on [SEP] after exactly these words."""
    circle = world.Shape("circle", "red", world.COLOURS["red"], (60.0, 50.0, 160.0, 150.0), 100.0)
    scene = world.Scene(256, 200, (235, 235, 235), (circle,))
    image = world.render(scene, random.Random(0), supersample=4)
    runner = load(CaptionRunner, "shapes-caption", "caption")
    [out] = run(runner, [(CaptionJob(image="s3://shapes/x.png", model=runner.name), image)])
    assert out.caption == "a red circle"
