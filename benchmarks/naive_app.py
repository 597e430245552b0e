"""The baseline a team writes first: one Celery task per image, the model card's code inside.

``celery -A benchmarks.naive_app worker --pool solo``: the model is loaded once at worker
start; each task does S3 get_object, PIL open, ``processor(image)``, ``model.generate`` on that
one image and returns the caption. No batching, no overlap of I/O and inference.

Configured by ``BENCH_REDIS_URL``, ``BENCH_MODEL``, ``BENCH_S3_ENDPOINT_URL``,
``BENCH_S3_ACCESS_KEY_ID``, ``BENCH_S3_SECRET_ACCESS_KEY`` and ``BENCH_GENERATE`` (JSON
keyword arguments of ``generate``).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

from celery import Celery, signals

QUEUE = "bench.naive"
TASK = "bench.naive_caption"

app = Celery("bench-naive", set_as_current=False)
app.conf.update(
    broker_url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
    result_backend=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    broker_connection_retry_on_startup=True,
)

_state: dict[str, Any] = {}


@signals.celeryd_after_setup.connect
def _load(**_: Any) -> None:
    """Load the model before the worker says it is ready (load time is not measured)."""
    import boto3
    import torch
    from transformers import BlipForConditionalGeneration, BlipProcessor

    source = os.environ["BENCH_MODEL"]
    _state["processor"] = BlipProcessor.from_pretrained(source)
    device = os.environ.get("BENCH_DEVICE", "cpu")
    dtype = getattr(torch, os.environ.get("BENCH_DTYPE", "float32"))
    model = BlipForConditionalGeneration.from_pretrained(source, dtype=dtype)
    _state["model"] = model.to(device).eval()
    _state["generate"] = json.loads(os.environ.get("BENCH_GENERATE", "{}"))
    _state["s3"] = boto3.client(
        "s3",
        endpoint_url=os.environ["BENCH_S3_ENDPOINT_URL"],
        aws_access_key_id=os.environ["BENCH_S3_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["BENCH_S3_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    _state["torch"] = torch


@app.task(name=TASK)  # type: ignore[untyped-decorator]
def caption(bucket: str, key: str) -> str:
    from PIL import Image

    body = _state["s3"].get_object(Bucket=bucket, Key=key)["Body"].read()
    image = Image.open(io.BytesIO(body)).convert("RGB")
    model = _state["model"]
    inputs = _state["processor"](image, return_tensors="pt").to(model.device, model.dtype)
    with _state["torch"].inference_mode():
        out = model.generate(**inputs, **_state["generate"])
    return str(_state["processor"].decode(out[0], skip_special_tokens=True))
