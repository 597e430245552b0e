"""Draft-mode JPEG decode: large photos decode at reduced scale, and the model sees the same
pixels within a stated tolerance (BLIP's own processor on both, normalized units)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from transformers.models.blip import BlipImageProcessorPil

from worker import images

LIMITS = images.Limits(max_bytes=50 * 2**20, max_pixels=50_000_000)
INPUT_SIDE = 384  # BLIP base and large
DRAFT_SIDE = 2 * INPUT_SIDE  # what the worker asks for
# Stated tolerance, in the processor's normalized units (1/255 of a pixel is about 0.015):
MEAN_TOLERANCE = 0.005
MAX_TOLERANCE = 0.05


def _photo(width: int, height: int, seed: int, *, orientation: int | None = None) -> bytes:
    """A photo-like JPEG: smooth colour fields, an edge, and sensor-like noise."""
    rng = np.random.default_rng(seed)
    grid = Image.fromarray(rng.integers(20, 235, (5, 6, 3), dtype=np.uint8), "RGB")
    field = np.asarray(grid.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    field[: height // 3, width // 2 :] *= 0.6  # a hard edge
    noisy = np.clip(field + rng.normal(0, 4, field.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(noisy, "RGB")
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(buf, format="JPEG", quality=90, exif=exif)
    return buf.getvalue()


@pytest.fixture(scope="module")
def processor() -> BlipImageProcessorPil:
    return BlipImageProcessorPil()  # 384 x 384, bicubic, CLIP mean/std: BLIP's defaults


@pytest.mark.parametrize(
    ("width", "height", "drafted"),
    [((2400), 1800, (1200, 900)), (3000, 2000, (1500, 1000)), (4032, 3024, (2016, 1512))],
)
def test_large_photos_decode_at_reduced_scale_within_tolerance(
    processor: BlipImageProcessorPil, width: int, height: int, drafted: tuple[int, int]
) -> None:
    data = _photo(width, height, seed=width)
    full = images.decode(data, LIMITS)
    draft = images.decode(data, LIMITS, DRAFT_SIDE)
    assert full.size == (width, height)
    assert draft.size == drafted  # never below twice the input side
    a = processor(full, return_tensors="np")["pixel_values"][0]
    b = processor(draft, return_tensors="np")["pixel_values"][0]
    error = np.abs(a - b)
    assert error.mean() <= MEAN_TOLERANCE, error.mean()
    assert error.max() <= MAX_TOLERANCE, error.max()


def test_photos_that_cannot_halve_above_twice_the_input_decode_in_full() -> None:
    data = _photo(1600, 1200, seed=1)  # 1/2 scale would be 800 x 600: 600 < 768
    assert images.decode(data, LIMITS, DRAFT_SIDE).size == (1600, 1200)


def test_exif_orientation_still_applies_to_a_drafted_photo() -> None:
    data = _photo(2400, 1800, seed=2, orientation=6)  # stored landscape, shown portrait
    assert images.decode(data, LIMITS).size == (1800, 2400)
    assert images.decode(data, LIMITS, DRAFT_SIDE).size == (900, 1200)


def test_png_is_never_drafted() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (2400, 1800), (10, 20, 30)).save(buf, format="PNG")
    assert images.decode(buf.getvalue(), LIMITS, DRAFT_SIDE).size == (2400, 1800)
