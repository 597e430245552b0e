"""Batched captions equal one-at-a-time captions, token for token (tiny model, real loading)."""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from PIL import Image

from producer.protocol.jobs import CaptionJob
from tests.fixtures.images import sample_jpegs
from worker.batcher import Batcher, BatchPolicy
from worker.models.base import Placement
from worker.models.blip_caption import CaptionRunner
from worker.settings import ModelSpec

PROMPTS = [None, "a photography of", "a picture of the red", "there is", None, "a"]


@pytest.fixture(scope="module")
def runner(tiny_caption_dir: Path) -> CaptionRunner:
    spec = ModelSpec(name="tiny", source=str(tiny_caption_dir), family="caption")
    loaded = CaptionRunner(spec, Placement(torch.device("cpu"), torch.float32))
    loaded.load()
    return loaded


def reference_ids(model_dir: Path, image: Image.Image, job: CaptionJob) -> list[int]:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(model_dir)
    model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
    inputs = processor(images=image, text=job.prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=job.max_new_tokens,
            min_new_tokens=job.min_new_tokens or None,
            num_beams=job.num_beams,
            do_sample=False,
        )
    return [int(t) for t in out[0]]


def images(count: int) -> list[Image.Image]:
    return [Image.open(io.BytesIO(data)).convert("RGB") for data in sample_jpegs(count, seed=3)]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_equals_one_by_one_with_mixed_prompts(
    runner: CaptionRunner, tiny_caption_dir: Path, num_beams: int
) -> None:
    pics = images(12)
    jobs = [
        CaptionJob(
            image=f"s3://bkt/{i}.jpg",
            model="tiny",
            prompt=PROMPTS[i % len(PROMPTS)],
            max_new_tokens=12,
            num_beams=num_beams,
        )
        for i in range(len(pics))
    ]
    # Group exactly as the worker does, then run each group as one batch.
    groups: dict[object, list[int]] = defaultdict(list)
    prepared = [runner.prepare(job, pic) for job, pic in zip(jobs, pics, strict=True)]
    for index, item in enumerate(prepared):
        groups[runner.group_key(item)].append(index)
    assert len(groups) == len(set(PROMPTS))  # identical prompts share, different ones do not
    batched: dict[int, list[int]] = {}
    for members in groups.values():
        items = [prepared[i] for i in members]
        for index, generated in zip(members, runner.run_batch(items), strict=True):
            batched[index] = generated.token_ids

    for index, job in enumerate(jobs):
        assert batched[index] == _strip(reference_ids(tiny_caption_dir, pics[index], job)), index


def test_prompt_is_echoed_and_continuation_separated(runner: CaptionRunner) -> None:
    pic = images(1)[0]
    job = CaptionJob(
        image="s3://bkt/x.jpg", model="tiny", prompt="A Photography of", max_new_tokens=6
    )
    (generated,) = runner.run_batch([runner.prepare(job, pic)])
    out = generated.output
    assert out.caption.startswith("a photography of")
    assert out.caption == f"a photography of {out.continuation}".strip()
    assert out.prompt == "A Photography of"


def test_min_new_tokens_is_honoured(runner: CaptionRunner) -> None:
    pic = images(1)[0]
    job = CaptionJob(image="s3://bkt/x.jpg", model="tiny", min_new_tokens=8, max_new_tokens=8)
    (generated,) = runner.run_batch([runner.prepare(job, pic)])
    assert len(generated.token_ids) == 1 + 8  # [DEC] + exactly eight new tokens


def test_through_the_batcher_from_many_threads(
    runner: CaptionRunner, tiny_caption_dir: Path
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    pics = images(10)
    jobs = [
        CaptionJob(
            image=f"s3://bkt/{i}.jpg", model="tiny", prompt=PROMPTS[i % 3], max_new_tokens=10
        )
        for i in range(10)
    ]
    batcher = Batcher(lambda key, items: runner.run_batch(items), lambda key: BatchPolicy(4, 0.05))
    batcher.start()

    def one(index: int) -> list[int]:
        item = runner.prepare(jobs[index], pics[index])
        return batcher.submit(runner.group_key(item), item).result(60).token_ids

    with ThreadPoolExecutor(10) as pool:
        got = list(pool.map(one, range(10)))
    batcher.stop(timeout=30)
    assert max(batcher.batch_sizes) > 1
    for index, job in enumerate(jobs):
        assert got[index] == _strip(reference_ids(tiny_caption_dir, pics[index], job))


def _strip(ids: list[int]) -> list[int]:
    while ids and ids[-1] == 0:
        ids = ids[:-1]
    return ids
