"""The model families a worker can load: family name -> runner class, in one place.

A runner class declares the job kinds it serves (``kinds``); everything else (the queues a
worker consumes, the check that a job's kind fits its model) asks this registry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from worker.models.base import ModelRunner, Placement
from worker.models.blip2 import Blip2Runner
from worker.models.blip_caption import CaptionRunner
from worker.models.blip_match import MatchRunner
from worker.models.blip_vqa import VqaRunner
from worker.models.null import NullRunner, SimRunner
from worker.settings import ModelSpec

log = logging.getLogger(__name__)

FAMILIES: dict[str, type[ModelRunner[Any]]] = {
    "caption": CaptionRunner,
    "vqa": VqaRunner,
    "match": MatchRunner,
    "blip2": Blip2Runner,
    "null": NullRunner,
    "sim": SimRunner,
}
"""Family name (``ModelSpec.family``) -> the runner that loads and runs it."""


def runner_class(family: str) -> type[ModelRunner[Any]]:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"model family {family!r} is not available") from None


def kinds_of(family: str) -> tuple[str, ...]:
    """The job kinds a family serves."""
    return runner_class(family).kinds


def served_kinds(specs: Sequence[ModelSpec]) -> list[str]:
    """Every job kind the given models serve, sorted."""
    return sorted({kind for spec in specs for kind in kinds_of(spec.family)})


def load_runner(
    spec: ModelSpec, placement: Placement, *, warmup: bool, sdpa: bool = True
) -> ModelRunner[Any]:
    """Build, load and warm up the runner of one model; log what was loaded, where, how fast.

    ``sdpa``: BLIP vision attention through torch's fused kernel (``worker.models.attention``).
    """
    runner = runner_class(spec.family)(spec, placement)
    started = time.perf_counter()
    runner.load()
    model = getattr(runner, "model", None)
    if sdpa and isinstance(model, torch.nn.Module):
        from worker.models.attention import use_sdpa_attention

        use_sdpa_attention(model)
    loaded = time.perf_counter() - started
    if warmup:
        runner.warmup()
    log.info(
        "loaded model %s (%s, serves %s) from %s on %s as %s in %.2fs (warm-up %.2fs)",
        spec.name,
        type(runner).__name__,
        "/".join(runner.kinds),
        spec.source,
        placement.device,
        str(placement.dtype).removeprefix("torch."),
        loaded,
        time.perf_counter() - started - loaded,
    )
    return runner
