"""BLIP-2 accuracy gates through the whole system: S3 server -> celery worker -> Redis.

One worker serves both trained BLIP-2 shapes fixtures (``shapes-blip2-opt``, decoder-only OPT;
``shapes-blip2-t5``, encoder-decoder T5). Held-out images go to the S3 server; captions (plain
and continuing ``a photo of``), VQA questions and chat turns (each asked with its true earlier
turns in ``VqaJob.history``) are submitted through the Client and read back from Redis.

Per family the answers must be right (caption exact match >= 0.98, VQA >= 0.95, chat turns
>= 0.95, the in-process gates' thresholds), and every answer must equal the in-process answer
of the worker's ``Blip2Runner`` for the same image bytes, job and prompt.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from PIL import Image

from producer import CaptionJob, CaptionOutput, Client, VqaJob, VqaOutput
from producer.cli.embedded import EmbeddedRedis, EmbeddedS3, WorkerProcess
from tests.e2e.conftest import REPO, worker_env
from tests.fixtures.shapes import chat, world
from worker.models.base import Placement
from worker.models.blip2 import Blip2Runner
from worker.settings import ModelSpec

MODELS = REPO / "tests" / "fixtures" / "models"
FAMILIES = {"opt": "shapes-blip2-opt", "t5": "shapes-blip2-t5"}
# The in-process gates' held-out set (tests/unit/test_blip2_shapes_accuracy.py), the same
# images, questions and chats: training used dataset seeds 1 and 2 only. On other held-out
# seeds the fixtures can miss the caption or chat gate by a few items (9_200_101 .. 9_200_103:
# captions 0.96 for both, OPT chat 0.946; docs: Fixture models).
CAPTION_SEED = 9_200_001
VQA_SEED = 9_200_002
CHAT_SEED = 9_200_003
N_CAPTION = 100  # images; each captioned plainly and continuing PROMPT
N_VQA = 60  # images; 367 questions
N_CHAT = 80  # images; one chat of CHAT_TURNS turns each
CHAT_TURNS = 3
PROMPT = "a photo of"
GATE = {"caption": 0.98, "vqa": 0.95, "chat": 0.95}
BUCKET = "blip2-shapes"
# A Redis database of its own on the shared server: its ledger, results stream and queues hold
# this module's jobs alone.
DB = 13

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

Turn = tuple[str, str]


@dataclass(frozen=True)
class Case:
    """One job for one family, its image and its truth; ``kind`` is caption, prompted, vqa
    or chat."""

    kind: str
    family: str
    job: CaptionJob | VqaJob
    image: Image.Image
    truth: str


def _db_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url.rsplit("/", 1)[0] + f"/{DB}"


def _upload(s3: Any, sample: world.Sample, prefix: str) -> tuple[str, Image.Image]:
    key = f"{prefix}/{sample.index}.{sample.ext}"
    s3.put_object(Bucket=BUCKET, Key=key, Body=sample.data)
    return f"s3://{BUCKET}/{key}", sample.decode()


def _cases(s3: Any) -> list[Case]:
    """Every job for both families; the images are uploaded once and shared."""
    s3.create_bucket(Bucket=BUCKET)
    per_image: list[tuple[str, Image.Image, str, str | None, list[Turn], str]] = []
    for sample in world.dataset(CAPTION_SEED, N_CAPTION):
        uri, image = _upload(s3, sample, "caption")
        truth = world.caption(sample.scene)
        per_image.append(("caption", image, uri, None, [], truth))
        per_image.append(("prompted", image, uri, PROMPT, [], f"{PROMPT} {truth}"))
    rng = random.Random(VQA_SEED)
    for sample in world.dataset(VQA_SEED, N_VQA):
        uri, image = _upload(s3, sample, "vqa")
        for question, answer in world.balanced_questions(sample.scene, rng):
            per_image.append(("vqa", image, uri, question, [], answer))
    rng = random.Random(CHAT_SEED)
    for index in range(N_CHAT):
        # three in four chat images hold two shapes: most follow-ups need their history
        sample = world.sample(CHAT_SEED, index, 2 if index % 4 else None)
        uri, image = _upload(s3, sample, "chat")
        episode = chat.episode(rng, sample.scene, CHAT_TURNS)
        for k, (question, answer) in enumerate(episode):
            per_image.append(("chat", image, uri, question, episode[:k], answer))
    cases = []
    for family, model in FAMILIES.items():
        for kind, image, uri, text, history, truth in per_image:
            job: CaptionJob | VqaJob
            if kind in ("caption", "prompted"):
                job = CaptionJob(image=uri, model=model, prompt=text)
            else:
                assert text is not None
                job = VqaJob(image=uri, model=model, question=text, history=list(history))
            cases.append(Case(kind, family, job, image, truth))
    return cases


@pytest.fixture(scope="module")
def blip2_shapes_worker(
    redis_server: EmbeddedRedis, s3_server: EmbeddedS3
) -> Iterator[WorkerProcess]:
    models = {name: str(MODELS / name) for name in FAMILIES.values()}
    env = worker_env(
        redis_server,
        s3_server,
        models,
        BLIPQ_REDIS_URL=_db_url(redis_server),
        BLIPQ_MAX_BATCH_SIZE="16",
        BLIPQ_MAX_WAIT_MS="30",
    )
    worker = WorkerProcess(env, cwd=REPO).start()
    yield worker
    assert worker.stop() == 0, worker.log()[-5000:]


@dataclass
class SystemRun:
    cases: list[Case]
    got: list[str]  # the caption or the answer, per case
    continuations: list[str | None]  # a caption's continuation after its prompt


@pytest.fixture(scope="module")
def system_run(
    blip2_shapes_worker: WorkerProcess,
    redis_server: EmbeddedRedis,
    s3,  # type: ignore[no-untyped-def]
) -> SystemRun:
    cases = _cases(s3)
    # interleave the families and kinds, as many producers would
    order = list(range(len(cases)))
    random.Random(CAPTION_SEED).shuffle(order)
    with Client(redis_url=_db_url(redis_server)) as client:
        ids = client.submit_many([cases[i].job for i in order])
        results = {r.job_id: r for r in client.results(ids, timeout=600)}
    by_case: dict[int, Any] = {i: results[job_id] for i, job_id in zip(order, ids, strict=True)}
    got: list[str] = []
    continuations: list[str | None] = []
    for index, case in enumerate(cases):
        result = by_case[index]
        assert result.ok, (case.job, result.error)
        if isinstance(case.job, CaptionJob):
            assert isinstance(result.output, CaptionOutput)
            got.append(result.output.caption)
            continuations.append(result.output.continuation)
        else:
            assert isinstance(result.output, VqaOutput)
            got.append(result.output.answer)
            continuations.append(None)
    batch_sizes = [r.batch_size for r in results.values()]
    assert max(batch_sizes) > 1, "the worker never batched: the equality below would be weak"
    return SystemRun(cases, got, continuations)


def _reference(family: str, cases: Sequence[Case]) -> list[str]:
    """The worker's runner in-process: the same prepare, group key and generate, in batches
    of 32 per group (the system's batches were other ones)."""
    name = FAMILIES[family]
    runner = Blip2Runner(
        ModelSpec(name=name, source=str(MODELS / name), family="blip2"),
        Placement(torch.device("cpu"), torch.float32),
    )
    runner.load()
    items = [runner.prepare(case.job, case.image) for case in cases]
    groups: dict[Any, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[runner.group_key(item)].append(index)
    out: list[str] = [""] * len(items)
    with torch.inference_mode():
        for indices in groups.values():
            for start in range(0, len(indices), 32):
                chunk = indices[start : start + 32]
                for index, result in zip(
                    chunk, runner.run_batch([items[i] for i in chunk]), strict=True
                ):
                    output = result.output
                    out[index] = (
                        output.caption if isinstance(output, CaptionOutput) else output.answer
                    )
    return out


def _rates(run: SystemRun, family: str) -> dict[str, tuple[float, int]]:
    right: dict[str, list[bool]] = defaultdict(list)
    for case, got in zip(run.cases, run.got, strict=True):
        if case.family == family:
            right[case.kind].append(got == case.truth)
    return {kind: (sum(v) / len(v), len(v)) for kind, v in right.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_system_answers_are_right(system_run: SystemRun, family: str) -> None:
    rates = _rates(system_run, family)
    print(
        f"{family} through the system: "
        + ", ".join(f"{kind} {rate:.3f} over {n}" for kind, (rate, n) in rates.items())
    )
    errors = [
        (c.kind, c.job.model_dump(include={"prompt", "question", "history"}), c.truth, g)
        for c, g in zip(system_run.cases, system_run.got, strict=True)
        if c.family == family and c.truth != g
    ][:8]
    assert rates["caption"][0] >= GATE["caption"], errors
    assert rates["prompted"][0] >= GATE["caption"], errors
    assert rates["vqa"][0] >= GATE["vqa"], errors
    assert rates["chat"][0] >= GATE["chat"], errors
    assert rates["vqa"][1] >= 300 and rates["chat"][1] == N_CHAT * CHAT_TURNS
    # a prompted caption is the prompt and then its continuation
    for case, got, continued in zip(
        system_run.cases, system_run.got, system_run.continuations, strict=True
    ):
        if case.family == family and case.kind == "prompted":
            assert got == f"{PROMPT} {continued}", (got, continued)


@pytest.mark.parametrize("family", FAMILIES)
def test_system_answers_equal_in_process_answers(system_run: SystemRun, family: str) -> None:
    cases = [c for c in system_run.cases if c.family == family]
    got = [g for c, g in zip(system_run.cases, system_run.got, strict=True) if c.family == family]
    reference = _reference(family, cases)
    differ = [
        (c.kind, c.job.model_dump(include={"prompt", "question", "history"}), g, r)
        for c, g, r in zip(cases, got, reference, strict=True)
        if g != r
    ]
    assert not differ, (len(differ), differ[:5])


@pytest.mark.parametrize("family", ["opt"])  # T5 the same way; one keeps the module short
def test_demo_on_a_blip2_fixture_marks_each_answer(family: str) -> None:
    """``blipq demo --model shapes-blip2-<family>``: its own Redis, S3 and worker; captions and
    VQA questions on the shipped shapes samples, each row marked right or wrong by the truth
    shipped beside them, which this test reads on its own."""
    samples = REPO / "producer" / "samples" / "shapes"
    captions: dict[str, str] = json.loads((samples / "truth.json").read_text())
    answers: dict[str, dict[str, str]] = json.loads((samples / "vqa.json").read_text())
    done = subprocess.run(
        [sys.executable, "-m", "producer.cli", "demo", "--model", FAMILIES[family], "--count", "8"],
        check=False,
        cwd=REPO,
        env={**os.environ, "BLIPQ_TORCH_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = done.stdout
    assert done.returncode == 0, (out[-3000:], done.stderr[-3000:])
    assert str(MODELS / FAMILIES[family]) in out
    rows = [line for line in out.splitlines() if line.startswith("shapes-")]
    caption_rows = [r for r in rows if r.split()[0] in captions and "?" not in r]
    vqa_rows = [r for r in rows if "?" in r]
    assert len(caption_rows) == 8 and len(vqa_rows) == sum(map(len, answers.values()))
    right = 0
    for row in caption_rows:
        name = row.split()[0]
        said = row.split(maxsplit=3)[3].split("  (")[0]
        ok = said == captions[name]
        assert row.endswith("(right)") if ok else "(WRONG: true caption" in row, row
        right += ok
    assert f"{right} of 8 captions are the true caption" in out
    right = 0
    for row in vqa_rows:
        name, rest = row.split(maxsplit=1)
        question = rest[: rest.index("?") + 1]
        said = rest[len(question) :].split("  (")[0].strip()
        ok = said == answers[name][question]
        assert row.endswith("(right)") if ok else "(WRONG: true answer" in row, row
        right += ok
    assert f"{right} of {len(vqa_rows)} answers are the true answer" in out
    assert right >= 0.9 * len(vqa_rows), out[-3000:]
