"""Resident memory of each process of a worker, one process against split (model process and
intake processes), with the same models and jobs.

    python -m benchmarks.split_memory [--models fixtures|base] [--intake-processes 2]

``fixtures``: the trained shapes-world fixtures (a VQA, a matching and a BLIP-2 OPT model, a few
MB each); ``base``: a BLIP-base-sized VQA model with random weights (``BlipConfig()`` defaults,
built once into ``BLIPQ_BENCH_CACHE``, 1.5 GB in float32) next to the BLIP-2 fixture;
``base-fp16``: the same saved in float16. Each worker answers the same jobs; then the memory of
each of its processes is read (``/proc/PID/status``), and the outputs of the two workers are
compared. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "producer" / "samples" / "shapes"
FIXTURES = REPO / "tests" / "fixtures" / "models"


def _models(which: str) -> dict[str, dict[str, str]]:
    blip2 = {"source": str(FIXTURES / "shapes-blip2-opt"), "family": "blip2"}
    if which in ("base", "base-fp16"):
        from benchmarks import fixtures

        vqa = fixtures.blip_random("base", head="vqa")
        if which == "base-fp16":
            vqa = _saved_in_float16(vqa)
        return {f"vqa-{which}": {"source": str(vqa), "family": "vqa"}, "shapes-blip2-opt": blip2}
    return {
        "shapes-vqa": {"source": str(FIXTURES / "shapes-vqa"), "family": "vqa"},
        "shapes-match": {"source": str(FIXTURES / "shapes-match"), "family": "match"},
        "shapes-blip2-opt": blip2,
    }


def _saved_in_float16(source: Path) -> Path:
    """The same checkpoint with its weights saved in float16 (a worker on the CPU loads them as
    float32: converted, not mapped from the file)."""
    import shutil

    import torch
    from transformers import BlipForQuestionAnswering

    directory = source.with_name(source.name + "-fp16")
    if not (directory / "model.safetensors").is_file():
        model = BlipForQuestionAnswering.from_pretrained(source, dtype=torch.float16)
        model.save_pretrained(directory)
        for path in source.iterdir():
            if path.name not in ("model.safetensors", "config.json"):
                shutil.copy(path, directory / path.name)
    return directory


def _jobs(models: dict[str, dict[str, str]]) -> list[Any]:
    from producer import CaptionJob, MatchJob, VqaJob

    jobs: list[Any] = []
    for image in sorted(p.name for p in SAMPLES.glob("shapes-*")):
        ref = f"s3://split-memory/{image}"
        for name, entry in models.items():
            if entry["family"] == "match":
                jobs.append(MatchJob(image=ref, model=name, texts=["a red circle", "a square"]))
                continue
            jobs.append(VqaJob(image=ref, model=name, question="what color is the circle?"))
            if entry["family"] == "blip2":
                jobs.append(CaptionJob(image=ref, model=name, max_new_tokens=8))
    return jobs


def _comparable(result: Any) -> Any:
    if not result.ok:
        return result.error
    output = result.output.model_dump()
    for score in output.get("scores", []):  # float sums may differ in the last bits by batch
        score["itm"], score["itc"] = round(score["itm"], 4), round(score["itc"], 4)
    return output


def _roles(launcher: int) -> dict[str, int]:
    """The worker's processes by role (a one-process worker is the launcher itself)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if int(stat[1]) == launcher:
                children.append((int(entry.name), cmdline))
    if not children:
        return {"worker (one process)": launcher}
    roles = {"launcher": launcher}
    intakes = sorted(pid for pid, cmd in children if "celery" in cmd)
    roles |= {f"intake {i}": pid for i, pid in enumerate(intakes)}
    for pid, cmd in children:
        if "worker.split.modelproc" in cmd:
            roles["model process"] = pid
    return roles


MEMORY = ("VmRSS", "RssAnon", "RssFile", "VmSize")
"""Read from ``/proc/PID/status``: resident (anonymous + file-backed), and the mapped size."""


def _memory_mb(pid: int) -> list[float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.split()[0] if value.split() else "0"
    return [int(fields.get(name, 0)) / 1024 for name in MEMORY]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", choices=["fixtures", "base", "base-fp16"], default="fixtures")
    parser.add_argument("--intake-processes", type=int, default=2)
    opts = parser.parse_args(argv)

    from producer import Client
    from producer.cli.embedded import EmbeddedRedis, EmbeddedS3, WorkerProcess

    models = _models(opts.models)
    jobs = _jobs(models)
    redis_server, s3_server = EmbeddedRedis().start(), EmbeddedS3().start()
    s3 = s3_server.client()
    s3.create_bucket(Bucket="split-memory")
    for path in SAMPLES.glob("shapes-*"):
        s3.put_object(Bucket="split-memory", Key=path.name, Body=path.read_bytes())
    outputs: dict[int, list[Any]] = {}
    rows = []
    try:
        for count in (0, opts.intake_processes):
            env = {
                "BLIPQ_REDIS_URL": redis_server.url,
                "BLIPQ_S3_ENDPOINT_URL": s3_server.endpoint_url,
                "BLIPQ_S3_ACCESS_KEY_ID": s3_server.access_key,
                "BLIPQ_S3_SECRET_ACCESS_KEY": s3_server.secret_key,
                "BLIPQ_MODELS": json.dumps(models),
                "BLIPQ_SERVE": ",".join(models),
                "BLIPQ_INTAKE_PROCESSES": str(count),
                "BLIPQ_MAX_BATCH_SIZE": "4",
                "BLIPQ_TORCH_THREADS": "1",
                "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            }
            worker = WorkerProcess(env, cwd=REPO).start(timeout=600)
            assert worker.proc is not None
            try:
                with Client(redis_url=redis_server.url) as client:
                    ids = client.submit_many(jobs)
                    results = {r.job_id: r for r in client.results(ids, timeout=900)}
                outputs[count] = [_comparable(results[i]) for i in ids]
                for role, pid in _roles(worker.proc.pid).items():
                    rows.append((count, role, _memory_mb(pid)))
            finally:
                worker.stop()
    finally:
        redis_server.close()
        s3_server.close()
    print(f"models: {', '.join(models)}; {len(jobs)} jobs per worker")
    print(f"| BLIPQ_INTAKE_PROCESSES | process | {' | '.join(f'{m} MB' for m in MEMORY)} |")
    print(f"|---|---|{'---:|' * len(MEMORY)}")
    for count, role, mbs in rows:
        print(f"| {count} | {role} | {' | '.join(f'{mb:.0f}' for mb in mbs)} |")
    same = outputs[0] == outputs[opts.intake_processes]
    errors = sum(not isinstance(o, dict) for out in outputs.values() for o in out)
    if errors:
        print({str(o) for out in outputs.values() for o in out if not isinstance(o, dict)})
    print(f"outputs equal: {same}; failed jobs: {errors}")
    return 0 if same and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
