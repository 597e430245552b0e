"""Texts and token budgets beyond a BLIP model's text positions fail alone with invalid_job in the
runner's prepare (before batching), naming the token count and the limit; never a tensor error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from producer import CaptionJob, MatchJob, VqaJob
from producer.protocol.errors import JobFailure
from tests.fixtures.images import sample_jpegs
from worker.models.base import ModelRunner, Placement
from worker.models.blip_caption import CaptionRunner
from worker.models.blip_match import MatchRunner
from worker.models.blip_vqa import VqaRunner
from worker.settings import ModelSpec

CPU = Placement(torch.device("cpu"), torch.float32)
POSITIONS = 64  # the tiny fixtures' text positions (tests/fixtures/tiny.py)
IMAGE = "s3://bkt/a.jpg"


def _image() -> Any:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(sample_jpegs(1, seed=5)[0])).convert("RGB")


def _load(cls: type[ModelRunner[Any]], directory: Path, family: str) -> Any:
    runner = cls(ModelSpec(name="tiny", source=str(directory), family=family), CPU)  # type: ignore[arg-type]
    runner.load()
    return runner


def _refused(runner: Any, job: Any, *words: str) -> None:
    with pytest.raises(JobFailure) as info:
        runner.prepare(job, _image())
    assert info.value.code == "invalid_job"
    for word in words:
        assert word in info.value.message, info.value.message


def test_caption_prompt_and_budget_over_the_positions(tiny_caption_dir: Path) -> None:
    runner = _load(CaptionRunner, tiny_caption_dir, "caption")
    runner.prepare(CaptionJob(image=IMAGE, max_new_tokens=POSITIONS - 1), _image())  # fits
    _refused(
        runner, CaptionJob(image=IMAGE, max_new_tokens=POSITIONS), f"{POSITIONS + 1} tokens", "64"
    )
    _refused(runner, CaptionJob(image=IMAGE, prompt="a " * 200, max_new_tokens=5), "limit of 64")


def test_vqa_question_and_answer_budget_over_the_positions(tiny_vqa_dir: Path) -> None:
    runner = _load(VqaRunner, tiny_vqa_dir, "vqa")
    runner.prepare(VqaJob(image=IMAGE, question="what?", max_new_tokens=POSITIONS - 1), _image())
    _refused(runner, VqaJob(image=IMAGE, question="why " * 100), "the question", "limit of 64")
    _refused(runner, VqaJob(image=IMAGE, question="what?", max_new_tokens=POSITIONS), "65 tokens")


def test_match_texts_over_the_positions(tiny_match_dir: Path) -> None:
    runner = _load(MatchRunner, tiny_match_dir, "match")
    runner.prepare(MatchJob(image=IMAGE, texts=["a cat"]), _image())
    _refused(runner, MatchJob(image=IMAGE, texts=["a cat", "dog " * 100]), "text 1", "limit of 64")
