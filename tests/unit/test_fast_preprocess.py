"""The direct preprocessing path gives the processor's pixels: within 1e-6 with PIL's resize
(``exact``, and enlarging), within two 8-bit levels with torch's (shrinking, in Pillow's pass
order: on photos under 1 % of values differ); anything the processor would do beyond resize +
rescale + normalize goes through the processor itself."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers.image_utils import PILImageResampling
from transformers.models.blip import BlipImageProcessorPil

from benchmarks.fixtures import make_photo
from worker.models import resize
from worker.models.base import _fast_plan, pixel_values
from worker.models.resize import (
    RESIZE_TOLERANCE,
    chw_uint8,
    pil_resizes_width_first,
    resized_uint8,
    rgbx_view,
    torch_agrees_with_pil,
    torch_resizes,
)

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
def test_exact_path_equals_the_processor(name: str, width: int, height: int, mode: str) -> None:
    processor = PROCESSORS[name]
    assert _fast_plan(processor) is not None
    image = _image(width, height, seed=width + height, mode=mode)
    expected = processor(image, return_tensors="pt")["pixel_values"][0]
    got = pixel_values(processor, image, exact=True)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert float((got - expected).abs().max()) <= TOLERANCE


def _one_level(processor: BlipImageProcessorPil) -> float:
    """One 8-bit level after the processor's rescale and normalize."""
    scale = processor.rescale_factor if processor.do_rescale else 1.0
    return scale / (min(processor.image_std) if processor.do_normalize else 1.0)


def _photo(seed: int) -> Image.Image:
    photo = Image.open(io.BytesIO(make_photo(seed))).convert("RGB")
    photo.info["photo"] = True
    return photo


def _sharp(width: int, height: int) -> Image.Image:
    """Black lines and red text on white: bicubic overshoots at every edge."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for x in range(0, width, 7):
        draw.line([(x, 0), (x + 50, height)], fill=(0, 0, 0), width=1)
    for y in range(0, height, 13):
        draw.text((5, y), "Hello WORLD 123", fill=(200, 0, 0))
    return image


SIDES = [390, 480, 640, 900, 1200, 2000]


def _torch_resized(processor: BlipImageProcessorPil, image: Image.Image) -> bool:
    size = (processor.size["width"], processor.size["height"])
    return torch_resizes(image.size, size, Image.Resampling(int(processor.resample)))


@pytest.mark.parametrize("name", sorted(PROCESSORS))
@pytest.mark.parametrize(
    "image",
    [
        *[
            pytest.param(lambda w=w, h=h: _sharp(w, h), id=f"sharp-{w}x{h}")
            for w in SIDES
            for h in SIDES
        ],
        pytest.param(lambda: _image(1600, 1200, seed=1), id="noise-1600x1200"),
        pytest.param(lambda: _image(2000, 400, seed=2), id="noise-2000x400"),
        pytest.param(lambda: _image(1000, 400, seed=3, mode="L"), id="noise-grey-1000x400"),
        *[pytest.param(lambda seed=seed: _photo(seed), id=f"photo-{seed}") for seed in range(4)],
    ],
)
def test_default_path_is_within_two_levels_of_the_processor(name: str, image: Any) -> None:
    processor = PROCESSORS[name]
    picture = image()
    expected = processor(picture, return_tensors="pt")["pixel_values"][0]
    got = pixel_values(processor, picture)
    assert got.shape == expected.shape and got.dtype == torch.float32
    diff = (got - expected).abs()
    if not _torch_resized(processor, picture):
        assert float(diff.max()) <= TOLERANCE  # PIL's resize: the processor's pixels
        return
    level = _one_level(processor)
    assert 2 * level <= RESIZE_TOLERANCE + 1e-9
    assert float(diff.max()) <= 2 * level + TOLERANCE
    if picture.info.get("photo"):
        assert float((diff > TOLERANCE).float().mean()) <= 0.01


def test_every_shrinking_shape_takes_the_torch_path_in_pillows_pass_order() -> None:
    """The tests above compare torch's resize with PIL's (not PIL's with itself), for sharp
    edges in shapes of both pass orders."""
    assert torch_agrees_with_pil()
    processor = PROCESSORS["blip-base"]
    assert all(_torch_resized(processor, _photo(seed)) for seed in range(4))
    shapes = [(w, h) for w in SIDES for h in SIDES]
    assert all(_torch_resized(processor, _sharp(*shape)) for shape in shapes)
    orders = {pil_resizes_width_first(shape, (384, 384)) for shape in shapes}
    assert orders == {True, False}


@pytest.mark.parametrize(
    ("source", "width_first"),
    [((1000, 1616), True), ((1000, 1617), False), ((500, 616), True), ((500, 617), False)],
)
def test_pillows_pass_order_is_the_one_measured(source: tuple[int, int], width_first: bool) -> None:
    """Pillow resizes the height first when it has more than twice as far to go as the width:
    a two-pass resize in the other order differs on noise, in the predicted one it is equal."""
    rng = np.random.default_rng(sum(source))
    image = Image.fromarray(rng.integers(0, 256, (source[1], source[0], 3), dtype=np.uint8))
    size, bicubic = (384, 384), Image.Resampling.BICUBIC
    once = np.asarray(image.resize(size, bicubic))
    by_width = np.asarray(image.resize((size[0], source[1]), bicubic).resize(size, bicubic))
    by_height = np.asarray(image.resize((source[0], size[1]), bicubic).resize(size, bicubic))
    assert pil_resizes_width_first(source, size) is width_first
    assert np.array_equal(once, by_width if width_first else by_height)
    assert not np.array_equal(once, by_height if width_first else by_width)


@pytest.mark.parametrize("size", [(64, 64), (300, 900), (97, 41), (383, 1000)])
def test_enlarging_takes_the_exact_path(size: tuple[int, int]) -> None:
    processor = PROCESSORS["blip-base"]
    image = _sharp(*size)
    expected = processor(image, return_tensors="pt")["pixel_values"][0]
    assert float((pixel_values(processor, image) - expected).abs().max()) <= TOLERANCE


def test_torch_resize_does_not_depend_on_the_thread_count() -> None:
    processor = PROCESSORS["blip-base"]
    picture = _photo(7)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pixel_values(processor, picture)
        torch.set_num_threads(2)
        two = pixel_values(processor, picture)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize(
    "image", [_photo(3), _sharp(901, 377), _image(640, 1000, 5)], ids=["photo", "lines", "noise"]
)
def test_the_resize_reads_pillows_pixels_without_a_copy(image: Image.Image) -> None:
    view = rgbx_view(image)
    assert view is not None and view.shape == (4, image.height, image.width)
    assert torch.equal(view[:3], chw_uint8(image))
    view_again = rgbx_view(image)
    assert view_again is not None and view_again.data_ptr() == view.data_ptr()  # not a copy


@pytest.mark.parametrize("size", [(384, 384), (224, 224), (364, 364)])
@pytest.mark.parametrize(
    "image", [_photo(4), _sharp(1000, 430), _sharp(430, 1000)], ids=["photo", "wide", "tall"]
)
def test_resizing_the_view_gives_the_pixels_of_resizing_a_copy(
    image: Image.Image, size: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both pass orders (the sharp images are one of each), bicubic and bilinear."""
    for resample in (Image.Resampling.BICUBIC, Image.Resampling.BILINEAR):
        from_view = resized_uint8(image, size, resample)
        with monkeypatch.context() as patched:
            patched.setattr(resize, "rgbx_view", lambda image: None)
            from_copy = resized_uint8(image, size, resample)
        assert from_view.shape == (3, size[1], size[0])
        assert torch.equal(from_view, from_copy)


def test_images_without_a_view_are_copied() -> None:
    gray = _image(300, 200, 1, mode="L")
    assert rgbx_view(gray) is None
    # Over Pillow's 16 MB memory block: stored in more than one block, so no single view.
    huge = Image.new("RGB", (2100, 2100), (10, 20, 30))
    assert rgbx_view(huge) is None
    resized = resized_uint8(huge, (384, 384), Image.Resampling.BICUBIC)
    assert resized[:, 100, 100].tolist() == [10, 20, 30]
