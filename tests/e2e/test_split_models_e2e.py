"""A split worker serving a BLIP VQA model, a BLIP matching model and a BLIP-2 model, whose
intake processes load no weights (``load_prepare``; checked directly in
``tests/unit/test_prepare_side.py``): every answer is the one-process worker's."""

from __future__ import annotations

import json
from typing import Any

import pytest

from producer import CaptionJob, Client, MatchJob, VqaJob
from producer.cli.embedded import EmbeddedRedis, EmbeddedS3, WorkerProcess
from tests.e2e.conftest import REPO, worker_env
from tests.e2e.test_split_e2e import _intake_pids, _model_pid

SAMPLES = REPO / "producer" / "samples" / "shapes"
MODELS = REPO / "tests" / "fixtures" / "models"
SERVED = {
    "shapes-vqa": {"source": str(MODELS / "shapes-vqa"), "family": "vqa"},
    "shapes-match": {"source": str(MODELS / "shapes-match"), "family": "match"},
    "shapes-blip2-opt": {"source": str(MODELS / "shapes-blip2-opt"), "family": "blip2"},
}


def _jobs() -> list[Any]:
    questions: dict[str, dict[str, str]] = json.loads((SAMPLES / "vqa.json").read_text())
    jobs: list[Any] = []
    for image, asked in sorted(questions.items()):
        ref = f"s3://split-models/{image}"
        for question in list(asked)[:3]:
            jobs.append(VqaJob(image=ref, model="shapes-vqa", question=question))
            jobs.append(VqaJob(image=ref, model="shapes-blip2-opt", question=question))
        jobs.append(CaptionJob(image=ref, model="shapes-blip2-opt", max_new_tokens=12))
        jobs.append(MatchJob(image=ref, model="shapes-match", texts=["a red circle", "a square"]))
    return jobs


def _output(result: Any) -> Any:
    output = result.output.model_dump()
    if "scores" in output:  # float sums may differ in the last bits between batch shapes
        return [(s["text"], round(s["itm"], 4), round(s["itc"], 4)) for s in output["scores"]]
    return output


@pytest.mark.timeout(900)
def test_split_worker_answers_like_one_process_without_weights_in_intakes(
    s3_server: EmbeddedS3, private_redis: EmbeddedRedis
) -> None:
    s3 = s3_server.client()
    s3.create_bucket(Bucket="split-models")
    for path in sorted(SAMPLES.glob("shapes-*")):
        s3.put_object(Bucket="split-models", Key=path.name, Body=path.read_bytes())
    jobs = _jobs()
    client = Client(redis_url=private_redis.url)
    outputs: dict[str, list[Any]] = {}
    try:
        for mode, processes in (("one", "0"), ("split", "2")):
            env = worker_env(
                private_redis,
                s3_server,
                SERVED,  # type: ignore[arg-type]
                BLIPQ_INTAKE_PROCESSES=processes,
                BLIPQ_MAX_BATCH_SIZE="4",
                BLIPQ_MAX_WAIT_MS="30",
            )
            worker = WorkerProcess(env, cwd=REPO).start()
            try:
                ids = client.submit_many(jobs)
                results = {r.job_id: r for r in client.results(ids, timeout=300)}
                assert worker.proc is not None
                if processes != "0":
                    _model_pid(worker.proc.pid)
                    assert len(_intake_pids(worker.proc.pid)) == 2
            finally:
                assert worker.stop() == 0, worker.log()[-4000:]
            assert all(r.ok for r in results.values()), [r.error for r in results.values()]
            outputs[mode] = [_output(results[i]) for i in ids]
    finally:
        client.close()
    assert outputs["split"] == outputs["one"]
