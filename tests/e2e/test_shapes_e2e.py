"""Accuracy gates through the whole system: S3 server -> celery worker -> Redis, trained models.

Every answer the system gives must equal the in-process answer for the same image, and the
answers must be right: captions exact-match >= 98%, VQA >= 95%, matching rank-1 >= 95%.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch

from producer import CaptionJob, CaptionOutput, Client, MatchJob, MatchOutput, VqaJob, VqaOutput
from producer.embedded import EmbeddedRedis, EmbeddedS3, WorkerProcess
from tests.e2e.conftest import REPO, worker_env
from tests.fixtures.shapes import world

MODELS = REPO / "tests" / "fixtures" / "models"
SEED = 9_000_101  # never used by training nor by the in-process gates
COUNT = 60


@pytest.fixture(scope="module")
def shapes_worker(redis_server: EmbeddedRedis, s3_server: EmbeddedS3) -> Iterator[WorkerProcess]:
    names = ["shapes-caption", "shapes-vqa", "shapes-match"]
    models = {name: str(MODELS / name) for name in names}
    env = worker_env(redis_server, s3_server, models, BLIPQ_MAX_WAIT_MS="30")
    worker = WorkerProcess(env, cwd=REPO).start()
    yield worker
    assert worker.stop() == 0, worker.log()[-5000:]


def test_shapes_accuracy_through_the_system(
    shapes_worker: WorkerProcess,
    client: Client,
    s3,  # type: ignore[no-untyped-def]
) -> None:
    samples = list(world.dataset(SEED, COUNT))
    s3.create_bucket(Bucket="shapes")
    rng = random.Random(SEED)
    captions, questions, matches = [], [], []
    for sample in samples:
        uri = f"s3://shapes/{sample.index}.{sample.ext}"
        s3.put_object(Bucket="shapes", Key=uri.split("/", 3)[3], Body=sample.data)
        truth = world.caption(sample.scene)
        question, answer = rng.choice(world.vqa_pairs(sample.scene))
        texts = [truth, *world.negative_captions(sample.scene)]
        captions.append((CaptionJob(image=uri, model="shapes-caption"), truth))
        questions.append((VqaJob(image=uri, model="shapes-vqa", question=question), answer))
        matches.append((MatchJob(image=uri, model="shapes-match", texts=texts), truth))

    jobs = [job for job, _ in captions + questions + matches]
    ids = client.submit_many(jobs)
    results = {r.job_id: r for r in client.results(ids, timeout=300)}
    got = [results[i] for i in ids]
    assert all(r.ok for r in got), [r.error for r in got if not r.ok][:3]

    cap_out = [r.output for r in got[:COUNT]]
    vqa_out = [r.output for r in got[COUNT : 2 * COUNT]]
    match_out = [r.output for r in got[2 * COUNT :]]
    assert all(isinstance(o, CaptionOutput) for o in cap_out)
    assert all(isinstance(o, VqaOutput) for o in vqa_out)
    assert all(isinstance(o, MatchOutput) for o in match_out)

    images = [s.decode() for s in samples]
    ref_caps = _reference_captions(images)
    ref_answers = _reference_answers(images, [job.question for job, _ in questions])
    assert [o.caption for o in cap_out] == ref_caps  # type: ignore[union-attr]
    assert [o.answer for o in vqa_out] == ref_answers  # type: ignore[union-attr]

    caption_acc = sum(o.caption == t for o, (_, t) in zip(cap_out, captions, strict=True)) / COUNT  # type: ignore[union-attr]
    vqa_acc = sum(o.answer == a for o, (_, a) in zip(vqa_out, questions, strict=True)) / COUNT  # type: ignore[union-attr]
    rank1 = sum(o.best().text == t for o, (_, t) in zip(match_out, matches, strict=True)) / COUNT  # type: ignore[union-attr]
    print(f"through the system: caption {caption_acc:.3f}  vqa {vqa_acc:.3f}  match {rank1:.3f}")
    assert caption_acc >= 0.98
    assert vqa_acc >= 0.95
    assert rank1 >= 0.95


def _reference_captions(images: list) -> list[str]:  # type: ignore[type-arg]
    from transformers import BlipForConditionalGeneration, BlipProcessor

    path = MODELS / "shapes-caption"
    processor = BlipProcessor.from_pretrained(path)
    model = BlipForConditionalGeneration.from_pretrained(path).eval()
    out = []
    with torch.inference_mode():
        for image in images:
            ids = model.generate(**processor(images=image, return_tensors="pt"), max_new_tokens=30)
            out.append(processor.decode(ids[0], skip_special_tokens=True).strip())
    return out


def _reference_answers(images: list, questions: list[str]) -> list[str]:  # type: ignore[type-arg]
    from transformers import BlipForQuestionAnswering, BlipProcessor

    path = MODELS / "shapes-vqa"
    processor = BlipProcessor.from_pretrained(path)
    model = BlipForQuestionAnswering.from_pretrained(path).eval()
    out = []
    with torch.inference_mode():
        for image, question in zip(images, questions, strict=True):
            inputs = processor(images=image, text=question, return_tensors="pt")
            ids = model.generate(**inputs, max_new_tokens=10)
            out.append(processor.decode(ids[0], skip_special_tokens=True).strip())
    return out
