"""Best-of-k captions: beam caption + nucleus samples, deduplicated, ITM-scored, best first."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from producer.protocol.errors import JobFailure
from producer.protocol.jobs import CaptionJob, ErrorCode, MatchJob
from tests.fixtures.images import sample_jpegs
from worker.models.base import Placement
from worker.models.blip_caption import CaptionRunner
from worker.models.blip_match import MatchRunner
from worker.settings import ModelSpec, Settings

CPU = Placement(torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def runners(tiny_caption_dir: Path, tiny_match_dir: Path) -> dict[str, Any]:
    caption = CaptionRunner(
        ModelSpec(name="cap", source=str(tiny_caption_dir), family="caption"), CPU
    )
    scorer = MatchRunner(ModelSpec(name="itm", source=str(tiny_match_dir), family="match"), CPU)
    peers: dict[str, Any] = {"cap": caption, "itm": scorer}
    for runner in peers.values():
        runner.load()
        runner.bind(peers, Settings(serve=["caption-base"], caption_scorer="itm"))
    return peers


def images(count: int) -> list[Image.Image]:
    return [Image.open(io.BytesIO(d)).convert("RGB") for d in sample_jpegs(count, seed=41)]


def test_candidates_are_ranked_deduplicated_and_scored_by_itm(runners: dict[str, Any]) -> None:
    caption, scorer = runners["cap"], runners["itm"]
    pics = images(3)
    jobs = [
        CaptionJob(image=f"s3://bkt/{i}.jpg", model="cap", candidates=5, max_new_tokens=6)
        for i in range(3)
    ]
    plain = [CaptionJob(image=f"s3://bkt/{i}.jpg", model="cap", max_new_tokens=6) for i in range(3)]
    ranked = caption.run_batch([caption.prepare(j, p) for j, p in zip(jobs, pics, strict=True)])
    alone = caption.run_batch([caption.prepare(j, p) for j, p in zip(plain, pics, strict=True)])
    for got, base, pic in zip(ranked, alone, pics, strict=True):
        out = got.output
        assert out.caption == base.output.caption  # the beam caption is unchanged by sampling
        assert out.candidates
        texts = [c.caption for c in out.candidates]
        assert len(texts) == len(set(texts)) <= 1 + 5
        assert out.caption in texts
        assert [c.source for c in out.candidates if c.caption == out.caption] == ["beam"]
        scores = [c.itm for c in out.candidates]
        assert scores == sorted(scores, reverse=True)
        # Each score is what the ITM model says for that text alone.
        check = scorer.run_batch(
            [scorer.prepare(MatchJob(image="s3://bkt/x.jpg", model="itm", texts=texts), pic)]
        )
        for candidate, reference in zip(out.candidates, check[0].output.scores, strict=True):
            assert abs(candidate.itm - reference.itm) < 1e-5


def test_best_of_k_needs_a_served_scorer(runners: dict[str, Any]) -> None:
    job = CaptionJob(image="s3://bkt/x.jpg", model="cap", candidates=2, scorer="not-served")
    with pytest.raises(JobFailure) as info:
        runners["cap"].prepare(job, images(1)[0])
    assert info.value.code == ErrorCode.UNKNOWN_MODEL
