"""Bulk runs through a real worker: every item once, stopped half way and resumed, from any machine.

Submissions are counted where they land: the worker logs ``Task blipq.run_job[<id>] received``
once per delivered message, so a job sent twice shows up twice.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from producer import Client
from producer.bulk import BulkError, job_id_for, start_run
from producer.cli.embedded import EmbeddedRedis, EmbeddedS3, WorkerProcess
from producer.protocol.keys import BULK_RUN_KEY
from tests.fixtures.images import sample_jpegs

REPO = Path(__file__).resolve().parents[2]
BLIPQ = (sys.executable, "-m", "producer.cli")
_RECEIVED = re.compile(r"Task blipq\.run_job\[([0-9a-f-]+)\] received")


def upload(s3, bucket: str, prefix: str, count: int) -> list[str]:  # type: ignore[no-untyped-def]
    """``count`` images under ``s3://bucket/prefix`` (a few distinct ones, repeated)."""
    s3.create_bucket(Bucket=bucket)
    images = sample_jpegs(8, seed=400)
    uris = []
    for index in range(count):
        key = f"{prefix}{index:04d}.jpg"
        s3.put_object(Bucket=bucket, Key=key, Body=images[index % len(images)])
        uris.append(f"s3://{bucket}/{key}")
    s3.put_object(Bucket=bucket, Key=f"{prefix}notes/", Body=b"")  # a folder marker: skipped
    return uris


def cli_env(redis_server: EmbeddedRedis, s3_server: EmbeddedS3) -> dict[str, str]:
    return {
        **os.environ,
        "BLIPQ_REDIS_URL": redis_server.url,
        "BLIPQ_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "BLIPQ_S3_ACCESS_KEY_ID": s3_server.access_key,
        "BLIPQ_S3_SECRET_ACCESS_KEY": s3_server.secret_key,
    }


def blipq(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BLIPQ, *args],
        check=False,
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )


def deliveries(worker: WorkerProcess, job_ids: set[str]) -> Counter[str]:
    """How often the worker received each of these jobs."""
    return Counter(j for j in _RECEIVED.findall(worker.log()) if j in job_ids)


def wait_for_done(r: redis.Redis, run_id: str, at_least: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = int(r.hget(BULK_RUN_KEY.format(run_id=run_id), "done") or 0)
        if done >= at_least:
            return done
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} did not reach {at_least} done")


def jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_prefix_run_stopped_half_way_resumes_without_repeating(
    caption_worker: WorkerProcess,
    redis_server: EmbeddedRedis,
    s3_server: EmbeddedS3,
    redis_client: redis.Redis,
    s3,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    uris = upload(s3, "bulk-cli", "photos/", 240)
    env = cli_env(redis_server, s3_server)
    out = tmp_path / "results.jsonl"
    command = [
        "bulk", "caption", "s3://bulk-cli/photos/",
        "--out", str(out), "--model", "tiny-caption", "--max-new-tokens", "8",
        "--max-pending", "24", "--chunk", "8",
    ]  # fmt: skip
    first = subprocess.Popen(
        [*BLIPQ, *command],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The run id is derived from the inputs; the runner prints it first.
        assert first.stderr is not None
        header = first.stderr.readline()
        match = re.match(r"run (\S+): 240 items", header)
        assert match, header
        run_id = match.group(1)
        wait_for_done(redis_client, run_id, 90)
        first.send_signal(signal.SIGTERM)  # a graceful stop, as Ctrl-C or a pod eviction
        rest = first.communicate(timeout=60)[1]
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 4, header + rest
    assert "stopped with" in rest and run_id in rest
    written = jsonl(out)
    assert 90 <= len(written) < 240
    assert len({row["item"] for row in written}) == len(written)

    status = blipq("status", run_id, env=env)
    assert status.returncode == 0, status.stderr
    assert re.search(r"state\s+stopped", status.stdout), status.stdout
    assert "/240 done" in status.stdout

    # The same command again: skips what is written, waits for what is in flight, sends the rest.
    again = blipq(*command, env=env)
    assert again.returncode == 0, again.stderr
    assert f"run {run_id}: 240 items" in again.stderr
    assert f"resumed: {len(written)} already written" in again.stderr
    assert "complete: 240 ok, 0 failed" in again.stderr

    rows = jsonl(out)
    assert sorted(str(row["item"]) for row in rows) == sorted(uris)  # each exactly once
    assert all(row["status"] == "ok" and row["image"] == row["item"] for row in rows)
    assert {row["job_id"] for row in rows} == {job_id_for(run_id, uri) for uri in uris}
    assert all(isinstance(row["output"], dict) and row["output"]["caption"] for row in rows)

    # Nothing was submitted twice: every job reached the worker exactly once.
    ids = {job_id_for(run_id, uri) for uri in uris}
    counts = deliveries(caption_worker, ids)
    assert set(counts) == ids
    assert max(counts.values()) == 1, counts.most_common(3)

    status = blipq("status", run_id, env=env)
    assert re.search(r"state\s+complete", status.stdout), status.stdout
    assert "240/240 done (100%), 0 failed, 240 submitted" in status.stdout
    as_json = json.loads(blipq("status", run_id, "--json", env=env).stdout)
    assert as_json["progress"]["done"] == as_json["progress"]["total"] == 240
    assert run_id in blipq("status", env=env).stdout  # listed among recent runs

    # A third start has nothing to do and sends nothing.
    third = blipq(*command, env=env)
    assert third.returncode == 0, third.stderr
    assert len(jsonl(out)) == 240
    assert max(deliveries(caption_worker, ids).values()) == 1


def test_python_bulk_stop_iterating_then_resume(
    caption_worker: WorkerProcess,
    client: Client,
    s3,  # type: ignore[no-untyped-def]
) -> None:
    uris = upload(s3, "bulk-py", "set/", 60)
    options = {"model": "tiny-caption", "max_new_tokens": 8}
    run = start_run(client.sender, uris, options=options, max_pending=12, chunk=6)
    assert run.total == 60 and not run.resumed
    # One runner per run: a second start while this one holds the lease is refused.
    with pytest.raises(BulkError, match="is being run by"):
        start_run(client.sender, uris, options=options)
    first: list[str] = []
    for item in run:
        assert item.result.ok, item.result.error
        first.append(item.key)
        if len(first) == 25:
            break  # stop iterating: in-flight jobs finish for the next start
    # Leaving the loop ended the run (the generator was dropped): what was handled is recorded.
    progress = run.progress()
    assert progress.total == 60 and progress.done == 24  # the last one handed out is not acked
    assert 25 <= progress.submitted < 60
    run.close()  # a no-op now; `with start_run(...) as run:` implies it

    with start_run(client.sender, uris, options=options, max_pending=12, chunk=6) as resumed:
        assert resumed.run_id == run.run_id and resumed.resumed
        second = [item.key for item in resumed]
    # At least once: the item being handled when the iteration stopped comes back; nothing else.
    assert set(first) & set(second) == {first[-1]}
    assert sorted(set(first) | set(second)) == sorted(uris)
    final = resumed.progress()
    assert (final.total, final.submitted, final.done, final.failed) == (60, 60, 60, 0)
    assert final.eta_s == 0.0 and resumed.complete

    ids = {job_id_for(run.run_id, uri) for uri in uris}
    counts = deliveries(caption_worker, ids)
    assert set(counts) == ids and max(counts.values()) == 1


def test_cli_vqa_manifest_to_csv_and_match_prefix_to_parquet(
    caption_worker: WorkerProcess,
    redis_server: EmbeddedRedis,
    s3_server: EmbeddedS3,
    s3,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    import pyarrow.parquet as pq

    uris = upload(s3, "bulk-kinds", "x/", 6)
    env = cli_env(redis_server, s3_server)
    manifest = tmp_path / "questions.csv"
    with manifest.open("w", newline="") as handle:
        rows = csv.writer(handle)
        rows.writerow(["id", "image", "question"])
        for index, uri in enumerate(uris):
            rows.writerow([f"q{index}", uri, "" if index % 2 else "what shape is it?"])
        rows.writerow(["missing", "s3://bulk-kinds/x/nope.jpg", ""])
    out_csv = tmp_path / "answers.csv"
    done = blipq(
        "bulk", "vqa", "--manifest", str(manifest), "--question", "what color is it?",
        "--model", "tiny-vqa", "--out", str(out_csv), "--run-id", "vqa-manifest-1",
        env=env,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr  # complete, with one failed item
    assert "complete: 6 ok, 1 failed" in done.stderr
    with out_csv.open(newline="") as handle:
        answers = {row["item"]: row for row in csv.DictReader(handle)}
    assert set(answers) == {f"q{i}" for i in range(6)} | {"missing"}
    assert answers["missing"]["error_code"] == "not_found"
    assert json.loads(answers["q0"]["output"])["question"] == "what shape is it?"
    assert json.loads(answers["q1"]["output"])["question"] == "what color is it?"
    status = json.loads(blipq("status", "vqa-manifest-1", "--json", env=env).stdout)
    assert (status["state"], status["progress"]["failed"]) == ("complete", 1)
    shown = blipq("status", "vqa-manifest-1", env=env).stdout
    assert re.search(rf"manifest\s+{re.escape(str(manifest.resolve()))}", shown), shown

    out_parquet = tmp_path / "scores.parquet"
    done = blipq(
        "bulk", "match", "s3://bulk-kinds/x/", "--text", "a red square", "--text", "a dog",
        "--model", "tiny-match", "--out", str(out_parquet),
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    table = pq.read_table(out_parquet).to_pylist()
    assert sorted(row["item"] for row in table) == sorted(uris)
    for row in table:
        scores = json.loads(row["output"])["scores"]
        assert [s["text"] for s in scores] == ["a red square", "a dog"]
        assert row["text"] in {"a red square", "a dog"}

    # The same run id with other options is refused rather than mixed.
    clash = blipq(
        "bulk", "vqa", "--manifest", str(manifest), "--question", "why?",
        "--model", "tiny-vqa", "--out", str(tmp_path / "other.csv"), "--run-id", "vqa-manifest-1",
        env=env,
    )  # fmt: skip
    assert clash.returncode == 2 and "exists with other inputs" in clash.stderr


def test_cli_killed_hard_resumes_with_force(
    caption_worker: WorkerProcess,
    redis_server: EmbeddedRedis,
    s3_server: EmbeddedS3,
    redis_client: redis.Redis,
    s3,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    # Enough items that the run is still going when it is killed (16 in flight at most).
    uris = upload(s3, "bulk-kill", "p/", 240)
    env = cli_env(redis_server, s3_server)
    out = tmp_path / "results.csv"
    command = [
        "bulk", "caption", "s3://bulk-kill/p/",
        "--out", str(out), "--model", "tiny-caption", "--max-new-tokens", "8",
        "--max-pending", "16", "--chunk", "8", "--run-id", "killed-1", "--quiet",
    ]  # fmt: skip
    first = subprocess.Popen([*BLIPQ, *command], env=env, cwd=REPO)
    try:
        wait_for_done(redis_client, "killed-1", 16)
        first.kill()  # SIGKILL: no cleanup, the lease stays until it expires
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    done = int(redis_client.hget(BULK_RUN_KEY.format(run_id="killed-1"), "done") or 0)
    assert done < len(uris), "the run finished before it could be killed: upload more items"
    refused = blipq(*command, env=env)
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert "force=True" not in refused.stderr  # the command line's words, not Python's
    again = blipq(*command, "--force", env=env)
    assert again.returncode == 0, again.stderr
    with out.open(newline="") as handle:
        items = [row["item"] for row in csv.DictReader(handle)]
    assert sorted(items) == sorted(uris)  # a torn last line was cut; nothing twice

    # Another output file for the same run: results are replayed from Redis, nothing is sent,
    # except an item whose stored result is gone (expired): that one is sent again.
    ids = {job_id_for("killed-1", uri) for uri in uris}
    before = deliveries(caption_worker, ids)
    lost = job_id_for("killed-1", uris[0])
    assert redis_client.delete(f"celery-task-meta-{lost}") == 1
    other = tmp_path / "replayed.jsonl"
    command[command.index(str(out))] = str(other)
    replay = blipq(*command, env=env)
    assert replay.returncode == 0, replay.stderr
    assert "1 finished items lost their stored results: resubmitted" in replay.stderr
    assert sorted(str(row["item"]) for row in jsonl(other)) == sorted(uris)
    assert deliveries(caption_worker, ids) - before == Counter({lost: 1})
