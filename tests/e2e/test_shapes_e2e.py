"""Accuracy gates through the whole system: S3 server -> celery worker -> Redis, trained models.

Every answer the system gives must equal the in-process answer for the same image, and the
answers must be right: captions exact-match >= 98%, VQA >= 95%, matching rank-1 >= 95%.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from PIL import Image

from producer import CaptionJob, CaptionOutput, Client, MatchJob, MatchOutput, VqaJob, VqaOutput
from producer.cli.embedded import EmbeddedRedis, EmbeddedS3, WorkerProcess
from tests.e2e.conftest import REPO, worker_env
from tests.fixtures.shapes import world

MODELS = REPO / "tests" / "fixtures" / "models"
SEED = 9_000_101  # never used by training nor by the in-process gates
COUNT = 60

pytestmark = pytest.mark.slow

# A Redis database of its own on the shared server: its ledger, results stream and queues hold
# this module's jobs alone.
DB = 12


def _db_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url.rsplit("/", 1)[0] + f"/{DB}"


@pytest.fixture(scope="module")
def shapes_worker(redis_server: EmbeddedRedis, s3_server: EmbeddedS3) -> Iterator[WorkerProcess]:
    names = ["shapes-caption", "shapes-vqa", "shapes-match"]
    models = {name: str(MODELS / name) for name in names}
    env = worker_env(
        redis_server,
        s3_server,
        models,
        BLIPQ_REDIS_URL=_db_url(redis_server),
        BLIPQ_MAX_WAIT_MS="30",
    )
    worker = WorkerProcess(env, cwd=REPO).start()
    yield worker
    assert worker.stop() == 0, worker.log()[-5000:]


@dataclass
class SystemRun:
    images: list[Image.Image]
    captions: list[tuple[CaptionOutput, str]]  # (system output, truth)
    answers: list[tuple[VqaJob, VqaOutput, str]]
    matches: list[tuple[MatchJob, MatchOutput, str]]


@pytest.fixture(scope="module")
def system_run(
    shapes_worker: WorkerProcess,
    redis_server: EmbeddedRedis,
    s3,  # type: ignore[no-untyped-def]
) -> SystemRun:
    """Caption, one VQA question and one matching job per image, all through the worker."""
    samples = list(world.dataset(SEED, COUNT))
    s3.create_bucket(Bucket="shapes")
    rng = random.Random(SEED)
    jobs: list[CaptionJob | VqaJob | MatchJob] = []
    truths: list[str] = []
    for sample in samples:
        uri = f"s3://shapes/{sample.index}.{sample.ext}"
        s3.put_object(Bucket="shapes", Key=uri.split("/", 3)[3], Body=sample.data)
        question, answer = rng.choice(world.vqa_pairs(sample.scene))
        truth = world.caption(sample.scene)
        texts = [truth, *world.negative_captions(sample.scene)]
        jobs += [
            CaptionJob(image=uri, model="shapes-caption"),
            VqaJob(image=uri, model="shapes-vqa", question=question),
            MatchJob(image=uri, model="shapes-match", texts=texts),
        ]
        truths += [truth, answer, truth]
    with Client(redis_url=_db_url(redis_server)) as client:
        ids = client.submit_many(jobs)
        results = {r.job_id: r for r in client.results(ids, timeout=600)}
    got = [results[i] for i in ids]
    assert all(r.ok for r in got), [r.error for r in got if not r.ok][:3]
    outputs = [r.output for r in got]
    rows = list(zip(jobs, outputs, truths, strict=True))
    captions = [(o, t) for _, o, t in rows[0::3]]
    answers = [(j, o, t) for j, o, t in rows[1::3]]
    matches = [(j, o, t) for j, o, t in rows[2::3]]
    assert all(isinstance(o, CaptionOutput) for o, _ in captions)
    assert all(isinstance(o, VqaOutput) for _, o, _ in answers)
    assert all(isinstance(o, MatchOutput) for _, o, _ in matches)
    return SystemRun([s.decode() for s in samples], captions, answers, matches)  # type: ignore[arg-type]


def test_system_answers_equal_in_process_answers(system_run: SystemRun) -> None:
    run = system_run
    assert [o.caption for o, _ in run.captions] == _reference_captions(run.images)
    questions = [job.question for job, _, _ in run.answers]
    assert [o.answer for _, o, _ in run.answers] == _reference_answers(run.images, questions)
    texts = [job.texts for job, _, _ in run.matches]
    assert [o.best().text for _, o, _ in run.matches] == _reference_best(run.images, texts)


def test_system_answers_are_right(system_run: SystemRun) -> None:
    run = system_run
    caption = sum(o.caption == t for o, t in run.captions) / COUNT
    vqa = sum(o.answer == t for _, o, t in run.answers) / COUNT
    match = sum(o.best().text == t for _, o, t in run.matches) / COUNT
    print(f"through the system: caption {caption:.3f}  vqa {vqa:.3f}  match {match:.3f}")
    assert caption >= 0.98 and vqa >= 0.95 and match >= 0.95, (caption, vqa, match)


def _processor(path: object) -> object:
    """The saved processor with the PIL image backend, as the worker loads it."""
    from transformers import BlipProcessor
    from transformers.models.blip import BlipImageProcessorPil

    processor = BlipProcessor.from_pretrained(path)
    processor.image_processor = BlipImageProcessorPil.from_pretrained(path)
    return processor


def _reference_captions(images: list[Image.Image]) -> list[str]:
    from transformers import BlipForConditionalGeneration

    path = MODELS / "shapes-caption"
    processor = _processor(path)
    model = BlipForConditionalGeneration.from_pretrained(path).eval()
    out = []
    with torch.inference_mode():
        for image in images:
            inputs = processor(images=image, return_tensors="pt")  # type: ignore[operator]
            ids = model.generate(**inputs, max_new_tokens=30)
            out.append(processor.decode(ids[0], skip_special_tokens=True).strip())  # type: ignore[attr-defined]
    return out


def _reference_answers(images: list[Image.Image], questions: list[str]) -> list[str]:
    from transformers import BlipForQuestionAnswering

    path = MODELS / "shapes-vqa"
    processor = _processor(path)
    model = BlipForQuestionAnswering.from_pretrained(path).eval()
    out = []
    with torch.inference_mode():
        for image, question in zip(images, questions, strict=True):
            inputs = processor(images=image, text=question, return_tensors="pt")  # type: ignore[operator]
            ids = model.generate(**inputs, max_new_tokens=10)
            out.append(processor.decode(ids[0], skip_special_tokens=True).strip())  # type: ignore[attr-defined]
    return out


def _reference_best(images: list[Image.Image], texts: list[list[str]]) -> list[str]:
    """The text with the highest ITM probability, one image at a time."""
    from transformers import BlipForImageTextRetrieval

    path = MODELS / "shapes-match"
    processor = _processor(path)
    model = BlipForImageTextRetrieval.from_pretrained(path).eval()
    out = []
    with torch.inference_mode():
        for image, candidates in zip(images, texts, strict=True):
            inputs = processor(  # type: ignore[operator]
                images=[image] * len(candidates), text=candidates, padding=True, return_tensors="pt"
            )
            itm = model(**inputs).itm_score.softmax(dim=-1)[:, 1]
            out.append(candidates[int(itm.argmax())])
    return out
