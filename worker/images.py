"""Decode an image's bytes, within limits, to an upright RGB Pillow image.

Every failure becomes an ``ImageFailure`` with an error code, so a bad object fails its own job
and nothing else. Reading the bytes from S3 is ``worker.storage``.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from producer.protocol.errors import JobFailure
from producer.protocol.jobs import ErrorCode

_BUFFER_REPR = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


class ImageFailure(JobFailure):
    """A permanent failure to get a usable image; ``code`` says which kind."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_bytes: int
    max_pixels: int


MIN_DRAFT_SIDE = 512
"""Never draft below this: smaller JPEGs decode in a few milliseconds anyway, and tiny models
(32-96 px inputs) then see exactly the pixels a full decode gives."""


def draft_side(input_side: int) -> int:
    """The side a JPEG may be drafted down to for a model whose input is ``input_side`` long."""
    return max(2 * input_side, MIN_DRAFT_SIDE)


def decode(data: bytes, limits: Limits, draft_side: int | None = None) -> Image.Image:
    """Decode bytes to an RGB image: EXIF orientation applied, first frame, alpha on white.

    ``draft_side``: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, far
    cheaper than a full decode) as long as both sides stay at least this long. The worker asks
    for twice the model's input side (at least ``MIN_DRAFT_SIDE``), so the resize to the input
    still averages over 2+ pixels.
    """
    if not data:
        raise ImageFailure("the object is empty (0 bytes)", code=ErrorCode.INVALID_IMAGE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > limits.max_pixels:
                raise ImageFailure(
                    f"image is {width}x{height} pixels; the limit is {limits.max_pixels}",
                    code=ErrorCode.TOO_LARGE,
                )
            image.seek(0)
            if draft_side and image.format == "JPEG":
                image.draft(None, (draft_side, draft_side))
            image.load()
    except ImageFailure:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageFailure(f"decompression bomb refused: {exc}", code=ErrorCode.TOO_LARGE) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow names the buffer it read ("<_io.BytesIO object at 0x...>"): nothing to show.
        detail = _BUFFER_REPR.sub("", str(exc)).strip() or type(exc).__name__
        raise ImageFailure(
            f"not a decodable image: {detail}", code=ErrorCode.INVALID_IMAGE
        ) from exc
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB: EXIF rotation, palette/greyscale/CMYK/16-bit converted, alpha over white."""
    ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in {"RGBA", "LA", "PA"}:
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode in {"I;16", "I;16B", "I;16L", "I"}:
        # 16-bit greyscale: scale to 8 bits rather than clip.
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB") if image.mode != "RGB" else image
