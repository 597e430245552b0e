"""VQA and matching jobs through a real worker: answers equal the one-at-a-time reference."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image

from producer import Client, ErrorCode, MatchJob, MatchOutput, VqaJob, VqaOutput
from producer.cli.embedded import WorkerProcess
from tests.fixtures.images import sample_jpegs

QUESTIONS = ["what?", "how many shapes are there?", "is there a blue triangle?", "what color?"]
TEXTS = ["a red circle", "a red circle and a blue square", "a cat"]


def test_vqa_and_match_jobs(
    caption_worker: WorkerProcess,
    client: Client,
    s3,  # type: ignore[no-untyped-def]
    tiny_vqa_dir: Path,
    tiny_match_dir: Path,
) -> None:
    from transformers import BlipForImageTextRetrieval, BlipForQuestionAnswering, BlipProcessor

    images = sample_jpegs(8, seed=21)
    s3.create_bucket(Bucket="vqa-match")
    for index, data in enumerate(images):
        s3.put_object(Bucket="vqa-match", Key=f"{index}.jpg", Body=data)
    vqa_jobs = [
        VqaJob(
            image=f"s3://vqa-match/{i % 8}.jpg",
            model="tiny-vqa",
            question=QUESTIONS[i % 4],
            max_new_tokens=5,
        )
        for i in range(24)
    ]
    match_jobs = [
        MatchJob(image=f"s3://vqa-match/{i}.jpg", model="tiny-match", texts=TEXTS[: 1 + i % 3])
        for i in range(8)
    ]
    wrong_model = VqaJob(image="s3://vqa-match/0.jpg", model="tiny-caption", question="what?")
    ids = client.submit_many([*vqa_jobs, *match_jobs, wrong_model])
    results = {r.job_id: r for r in client.results(ids, timeout=240)}

    processor = BlipProcessor.from_pretrained(tiny_vqa_dir)
    vqa = BlipForQuestionAnswering.from_pretrained(tiny_vqa_dir).eval()
    for job, job_id in zip(vqa_jobs, ids, strict=False):
        result = results[job_id]
        assert result.ok and isinstance(result.output, VqaOutput), result.error
        image = Image.open(io.BytesIO(images[int(job.image_ref.key[0])])).convert("RGB")
        with torch.inference_mode():
            ref = vqa.generate(
                **processor(images=image, text=job.question, return_tensors="pt"), max_new_tokens=5
            )
        assert result.output.answer == processor.decode(ref[0], skip_special_tokens=True).strip()

    matcher = BlipForImageTextRetrieval.from_pretrained(tiny_match_dir).eval()
    for job, job_id in zip(match_jobs, ids[len(vqa_jobs) :], strict=False):
        result = results[job_id]
        assert result.ok and isinstance(result.output, MatchOutput), result.error
        image = Image.open(io.BytesIO(images[int(job.image_ref.key[0])])).convert("RGB")
        for text, score in zip(job.texts, result.output.scores, strict=True):
            inputs = processor(images=image, text=text, return_tensors="pt")
            with torch.inference_mode():
                itm = matcher(**inputs).itm_score.softmax(dim=-1)[0, 1].item()
            assert abs(score.itm - itm) < 1e-5

    refused = results[ids[-1]]
    assert refused.error is not None and refused.error.code is ErrorCode.UNKNOWN_MODEL
    assert max(results[i].batch_size for i in ids[: len(vqa_jobs)]) > 1


def test_cli_vqa_and_match(caption_worker: WorkerProcess, client: Client, s3) -> None:  # type: ignore[no-untyped-def]
    import json
    import os
    import subprocess
    import sys

    s3.create_bucket(Bucket="cli-vqa")
    s3.put_object(Bucket="cli-vqa", Key="a.jpg", Body=sample_jpegs(1, seed=31)[0])
    env = {**os.environ, "BLIPQ_REDIS_URL": client.settings.redis_url}
    cli = [sys.executable, "-m", "producer.cli"]
    vqa = subprocess.run(
        [*cli, "vqa", "s3://cli-vqa/a.jpg", "--model", "tiny-vqa", "--question", "what?", "--wait"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(vqa.stdout)["output"]["question"] == "what?"
    match = subprocess.run(
        [
            *cli,
            "match",
            "s3://cli-vqa/a.jpg",
            "--model",
            "tiny-match",
            "--text",
            "a",
            "--text",
            "a red circle",
            "--wait",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    scores = json.loads(match.stdout)["output"]["scores"]
    assert [s["text"] for s in scores] == ["a", "a red circle"]
