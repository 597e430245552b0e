"""VQA and matching: batched output equals one-at-a-time output (tiny models, real loading)."""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from producer.protocol.jobs import MatchJob, VqaJob
from tests.fixtures.images import sample_jpegs
from worker.models.base import ModelRunner, Placement
from worker.models.blip_match import MatchRunner
from worker.models.blip_vqa import VqaRunner
from worker.settings import ModelSpec

CPU = Placement(torch.device("cpu"), torch.float32)
QUESTIONS = [
    "how many shapes are there?",
    "what color is the circle?",
    "is there a blue triangle?",
    "what shape is on the left?",
    "what?",
    "is the red circle on the left of the green square?",
]


def images(count: int) -> list[Image.Image]:
    return [Image.open(io.BytesIO(d)).convert("RGB") for d in sample_jpegs(count, seed=11)]


def load(runner_class: type[ModelRunner[Any]], directory: Path, kind: str) -> Any:
    runner = runner_class(ModelSpec(name="tiny", source=str(directory), family=kind), CPU)
    runner.load()
    return runner


def run_grouped(runner: Any, items: list[Any]) -> list[Any]:
    groups: dict[object, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[runner.group_key(item)].append(index)
    out: list[Any] = [None] * len(items)
    for members in groups.values():
        for index, result in zip(
            members, runner.run_batch([items[i] for i in members]), strict=True
        ):
            out[index] = result
    return out


def test_vqa_batched_equals_alone_with_questions_of_different_lengths(tiny_vqa_dir: Path) -> None:
    from transformers import BlipForQuestionAnswering, BlipProcessor

    runner = load(VqaRunner, tiny_vqa_dir, "vqa")
    pics = images(12)
    jobs = [
        VqaJob(image=f"s3://bkt/{i}.jpg", model="tiny", question=QUESTIONS[i % 6], max_new_tokens=6)
        for i in range(12)
    ]
    items = [runner.prepare(job, pic) for job, pic in zip(jobs, pics, strict=True)]
    batched = run_grouped(runner, items)

    processor = BlipProcessor.from_pretrained(tiny_vqa_dir)
    model = BlipForQuestionAnswering.from_pretrained(tiny_vqa_dir).eval()
    for job, pic, got in zip(jobs, pics, batched, strict=True):
        inputs = processor(images=pic, text=job.question, return_tensors="pt")
        with torch.inference_mode():
            ref = model.generate(**inputs, max_new_tokens=6, num_beams=1, do_sample=False)[0]
        ref_ids = [int(t) for t in ref]
        while ref_ids and ref_ids[-1] == 0:
            ref_ids.pop()
        assert got.token_ids == ref_ids, job.question
        assert got.output.answer == processor.decode(ref, skip_special_tokens=True).strip()


def test_vqa_padding_would_change_answers_so_lengths_never_share(tiny_vqa_dir: Path) -> None:
    runner = load(VqaRunner, tiny_vqa_dir, "vqa")
    pic = images(1)[0]
    short = runner.prepare(VqaJob(image="s3://bkt/a.jpg", question="what?"), pic)
    long = runner.prepare(
        VqaJob(image="s3://bkt/a.jpg", question="what shape is on the left?"), pic
    )
    assert runner.group_key(short) != runner.group_key(long)


def test_match_batched_equals_alone_within_1e5(tiny_match_dir: Path) -> None:
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    runner = load(MatchRunner, tiny_match_dir, "match")
    pics = images(5)
    texts = [
        "a red circle",
        "a red circle and a blue square",
        "a cat",
        "two dogs on a couch",
        "a picture of a yellow triangle on the left of a green square",
    ]
    jobs = [
        MatchJob(image=f"s3://bkt/{i}.jpg", model="tiny", texts=texts[: i + 1]) for i in range(5)
    ]
    items = [runner.prepare(job, pic) for job, pic in zip(jobs, pics, strict=True)]
    batched = runner.run_batch(items)  # one batch, 15 texts of many lengths, 5 images

    processor = BlipProcessor.from_pretrained(tiny_match_dir)
    model = BlipForImageTextRetrieval.from_pretrained(tiny_match_dir).eval()
    for job, pic, got in zip(jobs, pics, batched, strict=True):
        assert [s.text for s in got.output.scores] == job.texts
        for text, score in zip(job.texts, got.output.scores, strict=True):
            inputs = processor(images=pic, text=text, return_tensors="pt")
            with torch.inference_mode():
                itm = model(**inputs).itm_score.softmax(dim=-1)[0, 1].item()
                itc = model(**inputs, use_itm_head=False).itm_score[0, 0].item()
            assert abs(score.itm - itm) < 1e-5, (text, score.itm, itm)
            assert abs(score.itc - itc) < 1e-5, (text, score.itc, itc)
