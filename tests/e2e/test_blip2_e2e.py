"""BLIP-2 jobs through a real worker: captions, prompted captions, VQA and chat.

The worker serves a tiny random-weight BLIP-2 with an OPT language model (family inferred from
its config.json); every answer must equal the in-process one-at-a-time reference, and a chat
whose prompt is over the model's limit must fail alone with ``invalid_job``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from producer import CaptionJob, CaptionOutput, Client, ErrorCode, VqaJob, VqaOutput
from producer.cli.embedded import EmbeddedRedis, EmbeddedS3, WorkerProcess
from tests.e2e.conftest import REPO, worker_env
from tests.fixtures.images import sample_jpegs
from tests.fixtures.tiny_blip2 import NUM_QUERY_TOKENS, OPT_MAX_POSITIONS, build_blip2_opt

MODEL = "tiny-blip2-opt"
BUCKET = "blip2"
# A Redis database of its own on the shared server: its ledger, results stream and queues hold
# this module's jobs alone.
DB = 11
PROMPTS = ["a photography of", "a red", "a cat", "there is"]
QUESTIONS = ["what?", "how many shapes are there?", "what colour?"]
HISTORY = [("what is in the picture?", "a red circle"), ("how many?", "two")]


@pytest.fixture(scope="module")
def blip2_opt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_blip2_opt(tmp_path_factory.mktemp("tiny-blip2-opt"))


def _db_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url.rsplit("/", 1)[0] + f"/{DB}"


@pytest.fixture(scope="module")
def blip2_worker(
    redis_server: EmbeddedRedis, s3_server: EmbeddedS3, blip2_opt_dir: Path
) -> Iterator[WorkerProcess]:
    env = worker_env(
        redis_server,
        s3_server,
        {MODEL: str(blip2_opt_dir)},
        BLIPQ_REDIS_URL=_db_url(redis_server),
        BLIPQ_MAX_BATCH_SIZE="8",
        BLIPQ_MAX_WAIT_MS="50",
    )
    worker = WorkerProcess(env, cwd=REPO).start()
    yield worker
    code = worker.stop()
    assert code == 0, worker.log()[-5000:]


@pytest.fixture
def blip2_client(redis_server: EmbeddedRedis) -> Iterator[Client]:
    with Client(redis_url=_db_url(redis_server)) as c:
        yield c


def _prompt(question: str, history: list[tuple[str, str]]) -> str:
    """The BLIP-2 blog's chat prompt for OPT (single turn: the model card's format)."""
    turn = f"Question: {question} Answer:"
    if not history:
        return turn
    return " ".join(f"Question: {q} Answer: {a}." for q, a in history) + " " + turn


def test_blip2_caption_vqa_and_chat_jobs(
    blip2_worker: WorkerProcess,
    blip2_client: Client,
    s3,  # type: ignore[no-untyped-def]
    blip2_opt_dir: Path,
) -> None:
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    images = sample_jpegs(6, seed=71)
    s3.create_bucket(Bucket=BUCKET)
    for index, data in enumerate(images):
        s3.put_object(Bucket=BUCKET, Key=f"{index}.jpg", Body=data)

    def uri(i: int) -> str:
        return f"s3://{BUCKET}/{i % len(images)}.jpg"

    captions = [CaptionJob(image=uri(i), model=MODEL, max_new_tokens=8) for i in range(6)]
    prompted = [
        CaptionJob(image=uri(i), model=MODEL, prompt=PROMPTS[i % 4], max_new_tokens=8)
        for i in range(8)
    ]
    vqa = [
        VqaJob(image=uri(i), model=MODEL, question=QUESTIONS[i % 3], max_new_tokens=5)
        for i in range(9)
    ]
    chat = [
        VqaJob(
            image=uri(i),
            model=MODEL,
            question=QUESTIONS[i % 3],
            history=HISTORY[: 1 + i % 2],
            max_new_tokens=5,
            num_beams=2,
        )
        for i in range(4)
    ]
    too_long = VqaJob(
        image=uri(0),
        model=MODEL,
        question="and now?",
        history=[(f"what is the colour of the {i} shapes on the left?", "red") for i in range(20)],
    )
    jobs: list[CaptionJob | VqaJob] = [*captions, *prompted, *vqa, *chat, too_long]
    ids = blip2_client.submit_many(jobs)
    results = {r.job_id: r for r in blip2_client.results(ids, timeout=240)}

    processor = Blip2Processor.from_pretrained(blip2_opt_dir)
    model = Blip2ForConditionalGeneration.from_pretrained(blip2_opt_dir).eval()

    def reference(job: CaptionJob | VqaJob, prompt: str | None) -> tuple[list[int], list[int]]:
        image = Image.open(io.BytesIO(images[int(job.image_ref.key.split(".")[0])]))
        inputs: Any = processor(images=image.convert("RGB"), text=prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=job.max_new_tokens, num_beams=job.num_beams
            )[0].tolist()
        prompt_len = NUM_QUERY_TOKENS + 1 if prompt is None else inputs["input_ids"].shape[1]
        return out, out[prompt_len:]

    for job, job_id in zip(jobs[:-1], ids, strict=False):
        result = results[job_id]
        assert result.ok, (job, result.error)
        if isinstance(job, CaptionJob):
            full, new = reference(job, job.prompt)
            assert isinstance(result.output, CaptionOutput)
            continuation = processor.decode(new, skip_special_tokens=True).strip()
            assert result.output.continuation == continuation
            assert result.output.prompt == job.prompt
            if job.prompt is None:
                assert result.output.caption == continuation
            else:
                caption = processor.decode(full, skip_special_tokens=True).strip()
                assert result.output.caption == caption
                assert caption.startswith(job.prompt)
        else:
            _, new = reference(job, _prompt(job.question, job.history))
            assert isinstance(result.output, VqaOutput)
            assert result.output.answer == processor.decode(new, skip_special_tokens=True).strip()
            assert result.output.question == job.question

    refused = results[ids[-1]]
    assert not refused.ok and refused.error is not None
    assert refused.error.code is ErrorCode.INVALID_JOB
    assert f"limit of {OPT_MAX_POSITIONS} tokens" in refused.error.message, refused.error.message
    assert max(results[i].batch_size for i in ids[:-1]) > 1
