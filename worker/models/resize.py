"""Resizing to a model's input as Pillow does, in torch: the same pixels within two 8-bit levels.

The resize was most of a job's own CPU time (8.0 of 10.2 ms for a 1436 px photo to 384 px).
torch's antialiased bicubic/bilinear on 8-bit pixels is Pillow's filter (a = -0.5, the same
support), 5x faster (1.6 ms). Both resize in two passes and round (and clip) to 8 bits between
them, so the order of the passes matters: Pillow resizes the height first when it has more than
twice as far to go as the width (``pil_resizes_width_first``, measured on Pillow 13 to the
pixel), and a sharp edge's clipped overshoot then differs by up to 28 levels from width-first.
So the height-first case runs as two torch passes in that order. Enlarging differs too (up to
12 levels on noise) and stays with Pillow. A self-check on small sharp-edged probes of both
orders (``torch_agrees_with_pil``, once per process) turns the torch path off, with a warning,
if another Pillow or torch resizes otherwise.

The resize reads Pillow's own pixels, without a copy (``rgbx_view``): ``np.array(image)`` copied
them twice while holding the GIL (Pillow packing its 4-byte pixels to RGB, then numpy), 15 % of
a null-model worker's GIL time (py-spy ``--gil``).
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
from PIL import Image, ImageDraw

try:  # the zero-copy view of an image's pixels (rgbx_view); a copy without it
    import pyarrow
except ImportError:  # pragma: no cover - pyarrow is a dependency of the worker extra
    pyarrow = None

log = logging.getLogger(__name__)

TORCH_MODES = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear"}
LEVELS = 2
"""The most torch's resize may differ from Pillow's, in 8-bit levels."""
RESIZE_TOLERANCE = LEVELS / 255 / 0.26  # over the smallest std BLIP normalizes by
_PROBES = [((40, 30), (16, 16)), ((30, 80), (16, 16)), ((24, 90), (16, 20)), ((90, 24), (20, 16))]


def chw_uint8(image: Image.Image) -> torch.Tensor:
    """An RGB image as a (3, H, W) uint8 tensor (a view of a copy torch owns)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def rgbx_view(image: Image.Image) -> torch.Tensor | None:
    """Pillow's own pixels of an RGB image as a (4, H, W) uint8 tensor, not a copy: R, G, B and
    the padding byte Pillow stores with them. Read only: it is the image's memory.

    Pillow (>= 11.2) exports them over the Arrow C data interface, and pyarrow hands them to torch
    over DLPack. None where that is not possible: no pyarrow, an older Pillow, an image stored in
    more than one memory block (Pillow's blocks are 16 MB: over about 4 MP), the self-check failed.
    """
    if pyarrow is None or image.mode != "RGB" or not _view_agrees():
        return None
    try:
        pixels = pyarrow.array(image)
    except (ValueError, TypeError, AttributeError, pyarrow.ArrowException):
        return None
    values = getattr(pixels, "values", None)
    width, height = image.size
    if values is None or len(values) != width * height * 4 or values.type != pyarrow.uint8():
        return None
    return torch.from_dlpack(values).view(height, width, 4).permute(2, 0, 1)


@functools.cache
def _view_agrees() -> bool:
    """Whether ``rgbx_view`` reads the pixels ``np.array`` copies (once per process)."""
    probe = Image.merge("RGB", [Image.effect_noise((37, 23), sigma) for sigma in (20, 50, 80)])
    if pyarrow is None:
        return False
    try:
        values = pyarrow.array(probe).values
        view = torch.from_dlpack(values).view(23, 37, 4).permute(2, 0, 1)[:3]
        agrees = bool(torch.equal(view, chw_uint8(probe)))
    except Exception as exc:  # another layout, no DLPack in this pyarrow
        log.info("reading images through a copy: %s", exc)
        return False
    if not agrees:
        log.warning("Pillow's exported pixels differ from its copied ones; reading through a copy")
    return agrees


def resized_uint8(
    image: Image.Image, size: tuple[int, int], resample: Image.Resampling, *, exact: bool = False
) -> torch.Tensor:
    """An RGB image resized to ``size`` (width, height) as Pillow does, as (3, H, W) uint8."""
    if image.size == size:
        return chw_uint8(image)
    if exact or not torch_resizes(image.size, size, resample):
        return chw_uint8(image.resize(size, resample=resample))
    mode = TORCH_MODES[resample]
    width_first = pil_resizes_width_first(image.size, size)
    view = rgbx_view(image)
    if view is None:
        return resize_uint8(chw_uint8(image), size, mode, width_first=width_first)
    # All four bytes: torch's 8-bit kernels work on 4 channels anyway (faster than on a
    # 3-of-4 view); channels are resized independently, so R, G, B come out the same.
    return resize_uint8(view, size, mode, width_first=width_first)[:3]


def torch_resizes(
    source: tuple[int, int], target: tuple[int, int], resample: Image.Resampling
) -> bool:
    """Whether this resize runs in torch: shrinking, a filter torch has, the self-check passed."""
    (width, height), (to_width, to_height) = source, target
    shrinks = width >= to_width and height >= to_height
    return shrinks and resample in TORCH_MODES and torch_agrees_with_pil()


def pil_resizes_width_first(source: tuple[int, int], target: tuple[int, int]) -> bool:
    """Pillow's pass order: the height first when it has more than twice as far to go."""
    (width, height), (to_width, to_height) = source, target
    return height - to_height <= 2 * (width - to_width)


def resize_uint8(
    chw: torch.Tensor, size: tuple[int, int], mode: str, *, width_first: bool = True
) -> torch.Tensor:
    """Antialiased resize of a uint8 (C, H, W) tensor to ``size`` = (width, height).

    One interpolate call resizes the width first; ``width_first=False``: two calls, each
    resizing one side, the height first (8-bit rounding between them, as Pillow's passes).
    """
    width, height = size
    batch = chw.unsqueeze(0)
    if not width_first:
        batch = _interpolate(batch, height, batch.shape[3], mode)
    return _interpolate(batch, height, width, mode)[0]


def _interpolate(batch: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    return torch.nn.functional.interpolate(batch, size=(height, width), mode=mode, antialias=True)


@functools.cache
def torch_agrees_with_pil() -> bool:
    """Resize sharp-edged probes of both pass orders both ways; False (and a warning) if any
    differs by more than ``LEVELS`` (another Pillow's pass order, another torch kernel)."""
    for (width, height), size in _PROBES:
        probe = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(probe)
        for x in range(0, width, 3):
            draw.line([(x, 0), (x + 5, height)], fill=(0, 0, 0))
        for y in range(0, height, 4):
            draw.line([(0, y), (width, y + 2)], fill=(200, 0, 0))
        for resample, mode in TORCH_MODES.items():
            expected = torch.from_numpy(np.array(probe.resize(size, resample=resample)))
            first = pil_resizes_width_first(probe.size, size)
            got = resize_uint8(chw_uint8(probe), size, mode, width_first=first).permute(1, 2, 0)
            if int((got.int() - expected.int()).abs().max()) > LEVELS:
                log.warning(
                    "torch's resize differs from this Pillow's (%s, %s to %s); resizing with "
                    "Pillow (slower, the same pixels)",
                    mode,
                    probe.size,
                    size,
                )
                return False
    return True
