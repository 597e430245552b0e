"""The direct preprocessing path gives the processor's pixels (within 1e-6), and anything the
processor would do beyond resize + rescale + normalize goes through the processor itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import PILImageResampling
from transformers.models.blip import BlipImageProcessorPil

from worker.models.base import _fast_plan, pixel_values

TOLERANCE = 1e-6


def _image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    array[:, : width // 2] //= 3  # an edge, so the resize filter matters
    return Image.fromarray(array, "RGB").convert(mode)


PROCESSORS = {
    "blip-base": BlipImageProcessorPil(),  # 384, bicubic, CLIP mean/std
    "shapes-96-bilinear": BlipImageProcessorPil(
        size={"height": 96, "width": 96}, resample=PILImageResampling.BILINEAR
    ),
    "no-normalize": BlipImageProcessorPil(size={"height": 64, "width": 64}, do_normalize=False),
}


@pytest.mark.parametrize("name", sorted(PROCESSORS))
@pytest.mark.parametrize(
    ("width", "height", "mode"),
    [(1600, 1200, "RGB"), (300, 900, "RGB"), (64, 64, "RGB"), (384, 384, "RGB"), (200, 150, "L")],
)
def test_direct_path_equals_the_processor(name: str, width: int, height: int, mode: str) -> None:
    processor = PROCESSORS[name]
    assert _fast_plan(processor) is not None
    image = _image(width, height, seed=width + height, mode=mode)
    expected = processor(image, return_tensors="pt")["pixel_values"][0]
    got = pixel_values(processor, image)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert float((got - expected).abs().max()) <= TOLERANCE


def test_other_configurations_use_the_processor() -> None:
    cropping = BlipImageProcessorPil(do_resize=False)
    assert _fast_plan(cropping) is None
    image = _image(48, 32, seed=3)
    expected = cropping(image, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(pixel_values(cropping, image), expected)
