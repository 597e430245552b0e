"""What every model family provides, and where models are placed (device, dtype)."""

from __future__ import annotations

import logging
import weakref
from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from PIL import Image

from producer.protocol.errors import JobFailure
from producer.protocol.jobs import AnyJob, ErrorCode
from worker.models.resize import resized_uint8
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


J = TypeVar("J", bound=AnyJob)


class ModelRunner(ABC, Generic[J]):
    """One loaded model. ``prepare`` runs in worker threads; ``run_batch`` in the model thread."""

    kinds: tuple[str, ...]
    """The job kinds this runner serves."""

    def __init__(self, spec: ModelSpec, placement: Placement) -> None:
        self.spec = spec
        self.placement = placement
        self.peers: Mapping[str, ModelRunner[Any]] = {}
        self.settings: Settings | None = None

    def bind(self, peers: Mapping[str, ModelRunner[Any]], settings: Settings) -> None:
        """Called once all models are loaded: a runner may use another (e.g. an ITM scorer)."""
        self.peers = peers
        self.settings = settings

    @property
    def name(self) -> str:
        return self.spec.name

    def load(self) -> None:
        """Load from ``spec.source`` (hub id or local dir): the prepare side, then the model."""
        self.load_prepare()
        self.load_model()

    @abstractmethod
    def load_prepare(self) -> None:
        """What ``prepare`` and ``group_key`` need: processor, tokenizer, config, token limits;
        no weights. An intake process of a split worker loads only this (``worker.split``)."""

    @abstractmethod
    def load_model(self) -> None:
        """The model's weights, on ``placement``; called after ``load_prepare``."""

    @abstractmethod
    def prepare(self, job: J, image: Image.Image) -> Any:
        """Turn one job and its image into a model-ready item (CPU tensors)."""

    @abstractmethod
    def group_key(self, item: Any) -> Hashable:
        """Everything that must be equal for two prepared items to share one forward pass."""

    @abstractmethod
    def run_batch(self, items: list[Any]) -> Sequence[Any]:
        """Run items that share a group key; return exactly one output per item, in order."""

    @property
    def exact_resize(self) -> bool:
        """PIL's resize (the processor's exact pixels), not torch's (``BLIPQ_EXACT_RESIZE``)."""
        return self.settings.exact_resize if self.settings is not None else False

    def pixels(self, image_processor: Any, image: Image.Image) -> torch.Tensor:
        """``pixel_values`` with this worker's resize setting."""
        return pixel_values(image_processor, image, exact=self.exact_resize)

    def input_side(self) -> int | None:
        """The longest side of the model's input images (None: unknown; decode at full size)."""
        size = getattr(getattr(self, "image_processor", None), "size", None)
        if size is None:
            return None
        sides = [size.get(k) for k in ("height", "width", "shortest_edge", "longest_edge")]
        known = [int(side) for side in sides if side]
        return max(known) if known else None

    @abstractmethod
    def warmup(self) -> None:
        """Run one small batch so the first real job does not pay for lazy initialisation."""


def load_blip_processor(source: str) -> tuple[Any, Any]:
    """The processor of a BLIP checkpoint, with its image processor pinned to the PIL backend.

    The default backend depends on whether torchvision is installed, and the two resize
    differently: pinning it gives the same pixels from the same saved config on every machine.
    """
    from transformers import BlipProcessor
    from transformers.models.blip import BlipImageProcessorPil

    processor = BlipProcessor.from_pretrained(source)
    return processor, BlipImageProcessorPil.from_pretrained(source)


def pixel_values(image_processor: Any, image: Image.Image, *, exact: bool = False) -> torch.Tensor:
    """One image's (3, H, W) float32 tensor, as the processor makes it.

    BLIP's processors only resize (PIL), rescale and normalize: done directly (one resize, then
    in-place torch ops) that is 2.9x faster than the processor call (41 -> 14 ms for a 1.5 MP
    photo). Shrinking, the resize is torch's (``worker.models.resize``: PIL's filter and pass
    order, 5x faster, within two 8-bit levels); enlarging, or ``exact``: PIL's, equal to the
    processor within 1e-6. Any other configuration goes through the processor itself.
    """
    plan = _fast_plan(image_processor)
    if plan is None:
        slow: torch.Tensor = image_processor(image, return_tensors="pt")["pixel_values"][0]
        return slow
    size, resample, scale, mean, std = plan
    if image.mode != "RGB":
        image = image.convert("RGB")
    tensor = resized_uint8(image, size, resample, exact=exact).float()
    if scale is not None:
        tensor.mul_(scale)
    if mean is not None and std is not None:
        tensor.sub_(mean).div_(std)
    return tensor.contiguous()


_FastPlan = tuple[
    tuple[int, int], Image.Resampling, float | None, torch.Tensor | None, torch.Tensor | None
]


_fast_plans: dict[int, tuple[weakref.ref[Any], _FastPlan | None]] = {}
"""Per image processor (by identity, checked through a weak reference), its fast plan."""


def _fast_plan(processor: Any) -> _FastPlan | None:
    """What the processor would do, if it is only resize + rescale + normalize; else None."""
    known = _fast_plans.get(id(processor))
    if known is not None and known[0]() is processor:
        return known[1]
    plan: _FastPlan | None = None
    size = getattr(processor, "size", None)
    extra = ("do_center_crop", "do_pad", "do_reduce_labels", "do_flip_channel_order")
    if (
        type(processor).__name__ == "BlipImageProcessorPil"  # the PIL backend: same resize
        and getattr(processor, "do_resize", False)
        and size is not None
        and size.get("height")
        and size.get("width")
        and not any(getattr(processor, flag, False) for flag in extra)
    ):
        scale = float(processor.rescale_factor) if processor.do_rescale else None
        mean = std = None
        if processor.do_normalize:
            mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(3, 1, 1)
            std = torch.tensor(processor.image_std, dtype=torch.float32).view(3, 1, 1)
        resample = Image.Resampling(int(processor.resample))
        plan = ((int(size["width"]), int(size["height"])), resample, scale, mean, std)
    _fast_plans[id(processor)] = (weakref.ref(processor), plan)
    return plan


def stack_pixels(tensors: list[torch.Tensor], placement: Placement) -> torch.Tensor:
    """Stack one tensor per item into the model's batch, on its device, in its dtype.

    On CUDA, CPU tensors are stacked straight into pinned memory (one copy) and copied to the
    device asynchronously; tensors already on the device (the model process stages each item's
    pixels as it arrives, ``worker.split.pixels.Stager``) are stacked there.
    """
    device = placement.device
    if device.type != "cuda":
        return torch.stack(tensors).to(device, placement.dtype)
    if all(t.device == device for t in tensors):
        return torch.stack(tensors).to(dtype=placement.dtype)
    first = tensors[0]
    pinned = torch.empty((len(tensors), *first.shape), dtype=first.dtype, pin_memory=True)
    torch.stack([t.cpu() for t in tensors], out=pinned)
    return pinned.to(device, placement.dtype, non_blocking=True)


def strip_pad(ids: list[int], pad: int) -> list[int]:
    """Batched outputs are right-padded to the longest row; a row without its padding."""
    end = len(ids)
    while end > 0 and ids[end - 1] == pad:
        end -= 1
    return ids[:end]


def text_positions(config: Any) -> int | None:
    """The text positions of a BLIP model's text transformer (``None`` if its config has none)."""
    text = getattr(config, "text_config", config)
    positions = getattr(text, "max_position_embeddings", None)
    return int(positions) if isinstance(positions, int) else None


def check_tokens(model: str, what: str, tokens: int, limit: int | None, fix: str) -> None:
    """Refuse with ``invalid_job`` what would not fit the model's text positions: checked in a
    runner's ``prepare``, before batching, so it fails alone and never as a tensor error."""
    if limit is not None and tokens > limit:
        raise JobFailure(
            f"{what} is {tokens} tokens, over model {model!r}'s limit of {limit}; {fix}",
            code=ErrorCode.INVALID_JOB,
        )
