"""BLIP-2: prompt building, the prompt limit, and batched == one-at-a-time, token for token.

Tiny random-weight BLIP-2 models (tests/fixtures/tiny_blip2.py), one with a decoder-only OPT and
one with an encoder-decoder T5 language model, saved and loaded like hub checkpoints.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from producer.protocol.errors import JobFailure
from producer.protocol.jobs import CaptionJob, CaptionOutput, ErrorCode, VqaJob, VqaOutput
from tests.fixtures.images import sample_jpegs
from tests.fixtures.tiny_blip2 import (
    NUM_QUERY_TOKENS,
    OPT_MAX_POSITIONS,
    build_blip2_opt,
    build_blip2_t5,
)
from worker.models.base import Placement
from worker.models.blip2 import Blip2Runner, vqa_prompt
from worker.settings import ModelSpec, Settings

CPU = Placement(torch.device("cpu"), torch.float32)
FAMILIES = ["opt", "t5"]
URI = "s3://bkt/x.jpg"
HISTORY = [("what is in the picture?", "a red circle"), ("how many shapes?", "two")]
LONG_HISTORY = [
    (f"what is the colour of the {i} big shapes on the left?", "green") for i in range(20)
]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on busy cores they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        "opt": build_blip2_opt(tmp_path_factory.mktemp("tiny-blip2-opt")),
        "t5": build_blip2_t5(tmp_path_factory.mktemp("tiny-blip2-t5")),
    }


@pytest.fixture(scope="module")
def runners(model_dirs: dict[str, Path]) -> dict[str, Blip2Runner]:
    loaded = {}
    for family, directory in model_dirs.items():
        runner = Blip2Runner(ModelSpec(name="tiny", source=str(directory), family="blip2"), CPU)
        runner.load()
        # The processor's pixels exactly: compared token for token with the model card's way
        # (a random-weight model flips a near-tied token on a one-level pixel difference).
        runner.bind({"tiny": runner}, Settings(exact_resize=True))
        loaded[family] = runner
    return loaded


@pytest.fixture(scope="module")
def references(model_dirs: dict[str, Path]) -> dict[str, tuple[Any, Any]]:
    """The plain transformers way, one image at a time: processor + model.generate."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    return {
        family: (
            Blip2Processor.from_pretrained(directory),
            Blip2ForConditionalGeneration.from_pretrained(directory).eval(),
        )
        for family, directory in model_dirs.items()
    }


def images(count: int, seed: int = 5) -> list[Image.Image]:
    return [Image.open(io.BytesIO(d)).convert("RGB") for d in sample_jpegs(count, seed=seed)]


def blog_prompt(family: str, question: str, history: list[tuple[str, str]]) -> str:
    """The prompt as the BLIP-2 blog post builds it (single turn: the model card's format)."""
    label = "Short answer" if family == "t5" else "Answer"
    if not history:
        return f"Question: {question} {label}:"
    template = "Question: {} " + label + ": {}."
    context = " ".join([template.format(q, a) for q, a in history])
    return context + " Question: " + question + " " + label + ":"


def reference_ids(
    reference: tuple[Any, Any], image: Image.Image, prompt: str | None, **generate: Any
) -> list[int]:
    processor, model = reference
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, **generate)
    return [int(t) for t in out[0]]


def strip(ids: list[int], pad: int) -> list[int]:
    while ids and ids[-1] == pad:
        ids = ids[:-1]
    return ids


# --- prompts -------------------------------------------------------------------------------------


def test_vqa_prompt_formats() -> None:
    assert vqa_prompt("what?", encoder_decoder=False) == "Question: what? Answer:"
    assert vqa_prompt("what?", encoder_decoder=True) == "Question: what? Short answer:"
    assert vqa_prompt("why?", HISTORY, encoder_decoder=False) == (
        "Question: what is in the picture? Answer: a red circle. "
        "Question: how many shapes? Answer: two. Question: why? Answer:"
    )
    assert vqa_prompt("why?", HISTORY, encoder_decoder=True) == (
        "Question: what is in the picture? Short answer: a red circle. "
        "Question: how many shapes? Short answer: two. Question: why? Short answer:"
    )
    for family in FAMILIES:
        chat = vqa_prompt("why?", HISTORY, encoder_decoder=family == "t5")
        assert chat == blog_prompt(family, "why?", HISTORY)


@pytest.mark.parametrize("family", FAMILIES)
def test_runner_prompts_and_ids_match_the_processor(
    runners: dict[str, Blip2Runner], references: dict[str, tuple[Any, Any]], family: str
) -> None:
    runner, (processor, _) = runners[family], references[family]
    assert runner.encoder_decoder is (family == "t5")
    pic = images(1)[0]
    jobs: list[CaptionJob | VqaJob] = [
        CaptionJob(image=URI, model="tiny", prompt="a photography of"),
        VqaJob(image=URI, model="tiny", question="what colour?"),
        VqaJob(image=URI, model="tiny", question="what colour?", history=HISTORY),
    ]
    expected = [
        "a photography of",
        blog_prompt(family, "what colour?", []),
        blog_prompt(family, "what colour?", HISTORY),
    ]
    for job, prompt in zip(jobs, expected, strict=True):
        item = runner.prepare(job, pic)
        assert item.prompt == prompt
        ids = processor(images=pic, text=prompt, return_tensors="pt")["input_ids"][0]
        assert item.input_ids.tolist() == ids.tolist()
        assert item.input_ids[:NUM_QUERY_TOKENS].tolist() == [runner.image_token_id] * 8
    # No prompt: the ids generate() builds itself, image tokens then the LM's bos token.
    plain = runner.prepare(CaptionJob(image=URI, model="tiny"), pic)
    bos = runner.model.config.text_config.bos_token_id
    assert plain.prompt is None
    assert plain.input_ids.tolist() == [runner.image_token_id] * 8 + [bos]


def test_t5_without_bos_token_captions_from_its_eos_token(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    import json
    import shutil

    directory = Path(shutil.copytree(model_dirs["t5"], tmp_path / "t5-no-bos"))
    config = json.loads((directory / "config.json").read_text())
    del config["text_config"]["bos_token_id"]
    (directory / "config.json").write_text(json.dumps(config))
    runner = Blip2Runner(ModelSpec(name="tiny", source=str(directory), family="blip2"), CPU)
    runner.load()
    assert getattr(runner.model.config.text_config, "bos_token_id", None) is None
    item = runner.prepare(CaptionJob(image=URI, model="tiny"), images(1)[0])
    eos = runner.tokenizer.eos_token_id
    assert item.input_ids.tolist() == [runner.image_token_id] * NUM_QUERY_TOKENS + [eos]
    runner.run_batch([item])


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_over_the_limit_is_refused_not_truncated(
    runners: dict[str, Blip2Runner], family: str
) -> None:
    runner = runners[family]
    limit = OPT_MAX_POSITIONS if family == "opt" else 512
    assert runner.max_prompt_tokens == limit
    pic = images(1)[0]
    job = VqaJob(image=URI, model="tiny", question="and now?", history=LONG_HISTORY)
    if family == "t5":  # 512 tokens is a lot of text: make every turn long
        long_turns = [(q * 4, a) for q, a in LONG_HISTORY]
        job = VqaJob(image=URI, model="tiny", question="and now?", history=long_turns)
    text_tokens = len(runner.tokenizer(runner.build_prompt(job))["input_ids"])
    total = NUM_QUERY_TOKENS + text_tokens
    assert total > limit
    with pytest.raises(JobFailure) as caught:
        runner.prepare(job, pic)
    assert caught.value.code == ErrorCode.INVALID_JOB
    message = caught.value.message
    assert f"{total} tokens" in message and f"limit of {limit} tokens" in message, message
    assert "question or the history" in message

    # 500 characters the tokenizer never saw: two byte-level tokens each.
    long_prompt = CaptionJob(image=URI, model="tiny", prompt="\u00e9" * 500)
    with pytest.raises(JobFailure) as caught:
        runner.prepare(long_prompt, pic)
    assert (
        caught.value.code == ErrorCode.INVALID_JOB and "shorten the prompt" in caught.value.message
    )


def test_opt_prompt_plus_new_tokens_must_fit_the_positions(
    runners: dict[str, Blip2Runner],
) -> None:
    runner, pic = runners["opt"], images(1)[0]
    job = VqaJob(image=URI, model="tiny", question="what?", history=HISTORY[:1])
    prompt_tokens = int(runner.prepare(job, pic).input_ids.shape[0])
    fits = job.model_copy(update={"max_new_tokens": OPT_MAX_POSITIONS - prompt_tokens})
    runner.prepare(fits, pic)
    too_many = job.model_copy(update={"max_new_tokens": OPT_MAX_POSITIONS - prompt_tokens + 1})
    with pytest.raises(JobFailure) as caught:
        runner.prepare(too_many, pic)
    assert caught.value.code == ErrorCode.INVALID_JOB
    assert f"at most {OPT_MAX_POSITIONS - prompt_tokens}" in caught.value.message


def test_candidates_are_refused(runners: dict[str, Blip2Runner]) -> None:
    job = CaptionJob(image=URI, model="tiny", candidates=3)
    with pytest.raises(JobFailure) as caught:
        runners["opt"].prepare(job, images(1)[0])
    assert caught.value.code == ErrorCode.INVALID_JOB


def test_group_key(runners: dict[str, Blip2Runner]) -> None:
    runner, pic = runners["opt"], images(1)[0]

    def key(job: CaptionJob | VqaJob) -> object:
        return runner.group_key(runner.prepare(job, pic))

    # Different prompts of one token length share; other lengths, kinds or settings do not.
    assert key(CaptionJob(image=URI, prompt="a red")) == key(CaptionJob(image=URI, prompt="a cat"))
    assert key(CaptionJob(image=URI, prompt="a red")) != key(
        CaptionJob(image=URI, prompt="a red cat")
    )
    assert key(VqaJob(image=URI, question="what?")) != key(
        VqaJob(image=URI, question="how many?", history=HISTORY)
    )
    base = CaptionJob(image=URI, prompt="a red")
    for change in ({"max_new_tokens": 5}, {"min_new_tokens": 2}, {"num_beams": 2}):
        assert key(base) != key(base.model_copy(update=change)), change
    # A caption prompt and a VQA prompt of the same token length: kinds never share.
    vqa = runner.prepare(VqaJob(image=URI, question="what?", max_new_tokens=30), pic)
    prompt = runner.tokenizer.decode(vqa.input_ids[NUM_QUERY_TOKENS + 1 :])
    cap = runner.prepare(CaptionJob(image=URI, prompt=prompt), pic)
    assert cap.input_ids.tolist() == vqa.input_ids.tolist()
    assert runner.group_key(cap) != runner.group_key(vqa)


# --- fidelity ------------------------------------------------------------------------------------

CAPTION_PROMPTS = [None, "a photography of", "a red", "a cat", "there is a picture of the green"]
QUESTIONS = ["what?", "how many?", "is there a blue triangle?", "what colour is the circle?"]


def mixed_jobs(num_beams: int) -> list[CaptionJob | VqaJob]:
    jobs: list[CaptionJob | VqaJob] = []
    for index in range(2):  # each twice, on other images: equal-length prompts share batches
        for prompt in CAPTION_PROMPTS:
            jobs.append(
                CaptionJob(
                    image=f"s3://bkt/c{index}.jpg",
                    model="tiny",
                    prompt=prompt,
                    max_new_tokens=8,
                    num_beams=num_beams,
                )
            )
        for turn, question in enumerate(QUESTIONS):
            history = HISTORY[: turn % 3]
            jobs.append(
                VqaJob(
                    image=f"s3://bkt/q{index}.jpg",
                    model="tiny",
                    question=question,
                    history=history,
                    max_new_tokens=6,
                    num_beams=num_beams,
                )
            )
    return jobs


def run_grouped(runner: Blip2Runner, items: list[Any]) -> tuple[list[Any], list[int]]:
    groups: dict[object, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[runner.group_key(item)].append(index)
    out: list[Any] = [None] * len(items)
    for members in groups.values():
        results = runner.run_batch([items[i] for i in members])
        for index, result in zip(members, results, strict=True):
            out[index] = result
    return out, [len(members) for members in groups.values()]


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_one_by_one(
    runners: dict[str, Blip2Runner],
    references: dict[str, tuple[Any, Any]],
    family: str,
    num_beams: int,
) -> None:
    runner, reference = runners[family], references[family]
    processor = reference[0]
    jobs = mixed_jobs(num_beams)
    pics = images(len(jobs), seed=40 + num_beams)
    items = [runner.prepare(job, pic) for job, pic in zip(jobs, pics, strict=True)]
    batched, sizes = run_grouped(runner, items)
    assert max(sizes) >= 3  # several prompts of one length (and their repeats) in one batch
    assert len(sizes) > 2  # ... and others kept apart

    for job, pic, item, got in zip(jobs, pics, items, batched, strict=True):
        if isinstance(job, VqaJob):
            prompt: str | None = blog_prompt(family, job.question, job.history)
        else:
            prompt = job.prompt
        ref = reference_ids(
            reference,
            pic,
            prompt,
            max_new_tokens=job.max_new_tokens,
            num_beams=num_beams,
        )
        assert got.token_ids == strip(ref, runner.pad_token_id), (job.kind, prompt)
        new = ref[len(item.input_ids) :] if family == "opt" else ref[1:]
        text = processor.decode(strip(new, runner.pad_token_id), skip_special_tokens=True).strip()
        if isinstance(job, VqaJob):
            assert isinstance(got.output, VqaOutput)
            assert got.output.answer == text and got.output.question == job.question
        else:
            assert isinstance(got.output, CaptionOutput)
            assert got.output.continuation == text
            assert got.output.prompt == job.prompt
            if job.prompt is None:
                assert got.output.caption == text
            else:
                assert got.output.caption.startswith(job.prompt)
    # Random weights, but outputs still depend on the image and the prompt.
    assert len({tuple(got.token_ids[-6:]) for got in batched}) >= len(jobs) // 2


@pytest.mark.parametrize("family", FAMILIES)
def test_through_the_batcher_from_many_threads(
    runners: dict[str, Blip2Runner], references: dict[str, tuple[Any, Any]], family: str
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from worker.batcher import Batcher, BatchPolicy

    runner = runners[family]
    jobs = mixed_jobs(num_beams=1)
    pics = images(len(jobs), seed=90)
    batcher = Batcher(lambda key, items: runner.run_batch(items), lambda key: BatchPolicy(4, 0.05))
    batcher.start()

    def one(index: int) -> list[int]:
        item = runner.prepare(jobs[index], pics[index])  # prepare runs in many threads at once
        result: list[int] = batcher.submit(runner.group_key(item), item).result(60).token_ids
        return result

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(one, range(len(jobs))))
    batcher.stop(timeout=30)
    assert max(batcher.batch_sizes) > 1
    for job, pic, ids in zip(jobs, pics, got, strict=True):
        prompt = (
            blog_prompt(family, job.question, job.history)
            if isinstance(job, VqaJob)
            else job.prompt
        )
        ref = reference_ids(references[family], pic, prompt, max_new_tokens=job.max_new_tokens)
        assert ids == strip(ref, runner.pad_token_id), (job.kind, prompt)


def test_opt_caption_is_the_whole_decoded_row(
    runners: dict[str, Blip2Runner], references: dict[str, tuple[Any, Any]]
) -> None:
    runner, (processor, _) = runners["opt"], references["opt"]
    pic = images(1)[0]
    job = CaptionJob(image=URI, model="tiny", prompt="a photography of", max_new_tokens=6)
    (got,) = runner.run_batch([runner.prepare(job, pic)])
    ref = reference_ids(references["opt"], pic, job.prompt, max_new_tokens=6)
    assert isinstance(got.output, CaptionOutput)
    assert got.output.caption == processor.decode(ref, skip_special_tokens=True).strip()
    assert got.output.caption.startswith("a photography of")


def test_warmup(runners: dict[str, Blip2Runner]) -> None:
    for runner in runners.values():
        runner.warmup()
