"""What every model family provides, and where models are placed (device, dtype)."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from producer.jobs import CaptionJob
from worker.settings import ModelSpec, Settings

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def from_settings(cls, settings: Settings) -> Placement:
        name = settings.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(name)
        if settings.dtype == "auto":
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        else:
            dtype = _DTYPES[settings.dtype]
        return cls(device=device, dtype=dtype)


class ModelRunner(ABC):
    """One loaded model. ``prepare`` runs in worker threads; ``run_batch`` in the model thread."""

    kind: str

    def __init__(self, spec: ModelSpec, placement: Placement) -> None:
        self.spec = spec
        self.placement = placement

    @property
    def name(self) -> str:
        return self.spec.name

    @abstractmethod
    def load(self) -> None:
        """Load weights and processor from ``spec.source`` (hub id or local dir)."""

    @abstractmethod
    def group_key(self, job: CaptionJob) -> Hashable:
        """Everything that must be equal for two items to share one forward pass."""

    @abstractmethod
    def prepare(self, job: CaptionJob, image: Image.Image) -> Any:
        """Turn one job and its image into a model-ready item (CPU tensors)."""

    @abstractmethod
    def run_batch(self, items: list[Any]) -> Sequence[Any]:
        """Run items that share a group key; return exactly one output per item, in order."""

    @abstractmethod
    def warmup(self) -> None:
        """Run one small batch so the first real job does not pay for lazy initialisation."""


def load_runner(spec: ModelSpec, placement: Placement, *, warmup: bool) -> ModelRunner:
    """Build, load and warm up the runner of one model; log what was loaded, where, how fast."""
    from worker.models.blip_caption import CaptionRunner

    families: dict[str, type[ModelRunner]] = {"caption": CaptionRunner}
    if spec.kind not in families:
        raise ValueError(f"model {spec.name!r}: no model family serves kind {spec.kind!r}")
    runner = families[spec.kind](spec, placement)
    started = time.perf_counter()
    runner.load()
    loaded = time.perf_counter() - started
    if warmup:
        runner.warmup()
    log.info(
        "loaded model %s (%s, kind %s) from %s on %s as %s in %.2fs (warm-up %.2fs)",
        spec.name,
        type(runner).__name__,
        spec.kind,
        spec.source,
        placement.device,
        str(placement.dtype).removeprefix("torch."),
        loaded,
        time.perf_counter() - started - loaded,
    )
    return runner
