"""Moderation jobs through real workers: S3 server -> celery worker -> Redis.

Each worker here has a Redis of its own: every worker serving a match model consumes
``blipq.moderate``, and no other test's worker may take these jobs.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from producer import Client, ErrorCode, MatchJob, MatchOutput, ModerationJob, ModerationOutput
from producer.cli import main
from producer.cli.embedded import EmbeddedRedis, EmbeddedS3, WorkerProcess
from tests.e2e.conftest import REPO, worker_env
from tests.fixtures.images import sample_jpegs
from tests.fixtures.shapes import world

SHAPES_MATCH = REPO / "tests" / "fixtures" / "models" / "shapes-match"
SHAPES_SEED = 9_000_201  # held out: used by neither training nor threshold tuning
SHAPES_COUNT = 48

TINY_POLICY = {
    "name": "tiny",
    "version": "7",
    "model": "tiny-mod",
    "k": 4,
    "categories": [
        {
            "name": "animals",
            "review_threshold": 0.45,
            "block_threshold": 0.55,
        },
        {
            "name": "cats",
            "parent": "animals",
            "prompts": ["a cat", "two cats sitting on a couch"],
            "review_threshold": 0.5,
            "block_threshold": 0.6,
        },
        {
            "name": "dogs",
            "parent": "animals",
            "prompts": ["a dog", "a big brown dog on the grass"],
            "review_threshold": 0.5,
            "block_threshold": 0.6,
        },
        {
            "name": "red",
            "prompts": ["a red circle", "a red square", "a picture of a red triangle on the left"],
            "review_threshold": 0.48,
            "block_threshold": 0.52,
        },
    ],
}


def _serve(
    redis_server: EmbeddedRedis, env: dict[str, str]
) -> Iterator[tuple[EmbeddedRedis, WorkerProcess]]:
    """A worker on its own Redis for a module's tests; it must exit cleanly after them."""
    worker = WorkerProcess(env, cwd=REPO).start()
    yield redis_server, worker
    code = worker.stop()
    redis_server.close()
    assert code == 0, worker.log()[-5000:]


@pytest.fixture(scope="module")
def tiny_policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("policies") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_POLICY, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny_moderation(
    s3_server: EmbeddedS3, tiny_match_dir: Path, tiny_policy_file: Path
) -> Iterator[tuple[EmbeddedRedis, WorkerProcess]]:
    redis_server = EmbeddedRedis().start()
    env = worker_env(
        redis_server,
        s3_server,
        {"tiny-mod": str(tiny_match_dir)},
        BLIPQ_POLICIES=json.dumps({"tiny": str(tiny_policy_file)}),
        BLIPQ_MAX_BATCH_SIZE="8",
        BLIPQ_MAX_WAIT_MS="50",
    )
    yield from _serve(redis_server, env)


def test_moderation_jobs_equal_the_in_process_runner(
    tiny_moderation: tuple[EmbeddedRedis, WorkerProcess],
    s3,  # type: ignore[no-untyped-def]
    tiny_match_dir: Path,
    tiny_policy_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from worker.models.base import Placement
    from worker.models.blip_match import MatchRunner
    from worker.models.moderation import load_policy
    from worker.settings import ModelSpec

    redis_server, _ = tiny_moderation
    images = sample_jpegs(12, seed=31)
    s3.create_bucket(Bucket="moderation-tiny")
    for index, data in enumerate(images):
        s3.put_object(Bucket="moderation-tiny", Key=f"{index}.jpg", Body=data)
    uris = [f"s3://moderation-tiny/{i}.jpg" for i in range(12)]
    jobs = [ModerationJob(image=uri, model="tiny-mod", policy="tiny") for uri in uris]
    unknown = ModerationJob(image=uris[0], model="tiny-mod", policy="nope")
    other_model = ModerationJob(image=uris[0], model="tiny-mod", policy="default")
    match = MatchJob(image=uris[0], model="tiny-mod", texts=["a cat", "a red circle"])

    with Client(redis_url=redis_server.url) as client:
        ids = client.submit_many([*jobs, unknown, other_model, match])
        results = {r.job_id: r for r in client.results(ids, timeout=240)}

    policy = load_policy(tiny_policy_file, "tiny")
    runner = MatchRunner(
        ModelSpec(name="tiny-mod", source=str(tiny_match_dir), family="match"),
        Placement(torch.device("cpu"), torch.float32),
    )
    runner.load()
    runner.use_policies({"tiny": policy})
    for job_id, data, job in zip(ids, images, jobs, strict=False):
        result = results[job_id]
        assert result.ok and isinstance(result.output, ModerationOutput), result.error
        assert (result.kind, result.model) == ("moderate", "tiny-mod")
        assert (result.output.policy, result.output.version) == ("tiny", "7")
        image = Image.open(io.BytesIO(data)).convert("RGB")
        (alone,) = runner.run_batch([runner.prepare(job, image)])
        assert result.output.decision == alone.output.decision
        for got, ref in zip(result.output.categories, alone.output.categories, strict=True):
            assert (got.name, got.parent, got.flagged) == (ref.name, ref.parent, ref.flagged)
            assert abs(got.score - ref.score) < 1e-5
    assert max(results[i].batch_size for i in ids[:12]) > 1

    refused = results[ids[12]]
    assert refused.error is not None and refused.error.code is ErrorCode.INVALID_JOB
    assert "known policies" in refused.error.message and "'tiny'" in refused.error.message
    wrong = results[ids[13]]
    assert wrong.error is not None and wrong.error.code is ErrorCode.INVALID_JOB
    assert "model='itm-base'" in wrong.error.message
    matched = results[ids[14]]
    assert matched.ok and isinstance(matched.output, MatchOutput)

    # The CLI: one job, waited for; then a calibration run writing a policy the worker accepts.
    url = ["--redis-url", redis_server.url]
    assert (
        main([*url, "moderate", uris[3], "--model", "tiny-mod", "--policy", "tiny", "--wait"]) == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["status"] == "ok" and printed["output"]["policy"] == "tiny"

    manifest = tmp_path / "manifest.jsonl"
    labels = [["cats"], ["dogs"], ["red"], [], ["cats", "red"], []] * 2
    lines = [json.dumps({"image": u, "categories": c}) for u, c in zip(uris, labels, strict=True)]
    manifest.write_text("\n".join(lines) + "\n")
    written = tmp_path / "calibrated.yaml"
    calibrate = ["moderation", "calibrate", str(manifest), "--policy", "tiny"]
    options = ["--model", "tiny-mod", "--base", str(tiny_policy_file), "--write", str(written)]
    assert main([*url, *calibrate, *options, "--precision", "0.6", "--timeout", "120"]) == 0
    out = capsys.readouterr().out
    assert "12 images scored" in out and "animals" in out
    calibrated = load_policy(written, "tiny")
    assert calibrated.version.startswith("7-calibrated-")
    assert calibrated.prompts == policy.prompts


@pytest.fixture(scope="module")
def shapes_moderation(s3_server: EmbeddedS3) -> Iterator[tuple[EmbeddedRedis, WorkerProcess]]:
    assert (SHAPES_MATCH / "config.json").is_file(), (
        f"{SHAPES_MATCH} is missing: train the fixture models "
        "(python -m tests.fixtures.shapes.train --out tests/fixtures/models)"
    )
    redis_server = EmbeddedRedis().start()
    # The shapes policy is a fixture policy (tests/fixtures/policies/shapes.yaml): served as is.
    env = worker_env(
        redis_server, s3_server, {"shapes-match": str(SHAPES_MATCH)}, BLIPQ_MAX_WAIT_MS="30"
    )
    yield from _serve(redis_server, env)


def test_shapes_policy_flags_exactly_the_images_with_red(
    shapes_moderation: tuple[EmbeddedRedis, WorkerProcess],
    s3,  # type: ignore[no-untyped-def]
) -> None:
    redis_server, _ = shapes_moderation
    samples = list(world.dataset(SHAPES_SEED, SHAPES_COUNT))
    s3.create_bucket(Bucket="moderation-shapes")
    jobs = []
    for sample in samples:
        key = f"{sample.index}.{sample.ext}"
        s3.put_object(Bucket="moderation-shapes", Key=key, Body=sample.data)
        jobs.append(
            ModerationJob(
                image=f"s3://moderation-shapes/{key}", model="shapes-match", policy="shapes"
            )
        )
    with Client(redis_url=redis_server.url) as client:
        ids = client.submit_many(jobs)
        results = {r.job_id: r for r in client.results(ids, timeout=300)}

    rows = []
    for sample, job_id in zip(samples, ids, strict=True):
        result = results[job_id]
        assert result.ok and isinstance(result.output, ModerationOutput), result.error
        red = next(c for c in result.output.categories if c.name == "red")
        contains_red = any(shape.colour == "red" for shape in sample.scene.shapes)
        rows.append((world.caption(sample.scene), contains_red, red.flagged, red.score))
        assert (result.output.decision != "allow") == (red.flagged != "none")
    agree = sum(contains_red == (flagged != "none") for _, contains_red, flagged, _ in rows)
    positives = sum(contains_red for _, contains_red, _, _ in rows)
    print(f"shapes policy: flagged == contains red on {agree}/{len(rows)} ({positives} with red)")
    wrong = [row for row in rows if row[1] != (row[2] != "none")]
    assert not wrong, wrong
    assert 0 < positives < len(rows)
