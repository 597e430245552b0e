"""Decoding and limits, without a server: every bad input becomes a coded ImageFailure."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image

from producer.protocol.jobs import ErrorCode
from tests.fixtures.images import encode, make_image
from worker.images import ImageFailure, Limits, decode

LIMITS = Limits(max_bytes=10_000_000, max_pixels=4_000_000)


def test_rgb_jpeg_round_trip() -> None:
    out = decode(encode(make_image(1)), LIMITS)
    assert out.mode == "RGB"


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "LA", "L", "1", "I;16"])
def test_modes_convert_to_rgb(mode: str) -> None:
    source = Image.new("RGB", (40, 30), (10, 120, 240))
    image = source.convert(mode) if mode != "I;16" else Image.new("I;16", (40, 30), 40000)
    fmt = "TIFF" if mode in {"CMYK", "I;16"} else "PNG"
    out = decode(encode(image, fmt), LIMITS)
    assert out.mode == "RGB" and out.size == (40, 30)


def test_transparent_pixels_become_white() -> None:
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert decode(encode(image, "PNG"), LIMITS).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    image = Image.new("I;16", (4, 4), 32768)
    assert decode(encode(image, "PNG"), LIMITS).getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (60, 20), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(image, "JPEG", exif=exif.tobytes())
    assert decode(data, LIMITS).size == (20, 60)


def test_animated_gif_gives_the_first_frame() -> None:
    frames = [Image.new("RGB", (10, 10), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    r, _, b = decode(buffer.getvalue(), LIMITS).getpixel((5, 5))  # type: ignore[misc]
    assert r > 200 and b < 50


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", ErrorCode.INVALID_IMAGE),
        (bytes(random.Random(0).randbytes(5000)), ErrorCode.INVALID_IMAGE),
        (b"hello, I am a text file named cat.jpg\n" * 20, ErrorCode.INVALID_IMAGE),
        (encode(make_image(2))[:300], ErrorCode.INVALID_IMAGE),
        (encode(Image.new("L", (3000, 2000)), "PNG"), ErrorCode.TOO_LARGE),
    ],
    ids=["empty", "random", "text", "truncated", "too-many-pixels"],
)
def test_bad_bytes_fail_with_a_code(data: bytes, code: ErrorCode) -> None:
    with pytest.raises(ImageFailure) as info:
        decode(data, LIMITS)
    assert info.value.code == code
    assert info.value.message
    # No repr of the buffer Pillow read (``<_io.BytesIO object at 0x...>``) in what users see.
    assert "BytesIO" not in info.value.message and " at 0x" not in info.value.message
