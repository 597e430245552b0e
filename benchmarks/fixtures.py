"""What the benchmark runs on, built offline and cached under a temp dir.

- Photo-like JPEGs: 640-1600 px on the long side, 100-400 KB each (smooth gradients, soft
  shapes, texture and sensor-like noise; the noise level is tuned per image so the JPEG lands
  in the size range, as camera photos of those sizes do).
- A full-size BLIP-base captioning checkpoint with random weights (``BlipConfig()`` defaults:
  ViT-B/16 at 384 px + BERT-base text decoder, vocab 30524), a BERT tokenizer over a
  synthetic vocabulary with BLIP-base's layout, saved with ``save_pretrained`` like a hub
  checkpoint.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CACHE = Path(os.environ.get("BLIPQ_BENCH_CACHE", Path(tempfile.gettempdir()) / "blipq-bench"))
MIN_BYTES, MAX_BYTES = 100_000, 400_000
_IMAGES_VERSION = "v1"
_MODEL_VERSION = "v1"
_ASPECTS = (4 / 3, 3 / 2, 16 / 9, 1.0, 3 / 4, 2 / 3)


def _scene(rng: random.Random, width: int, height: int) -> np.ndarray:
    """A smooth photo-like scene (float32 HxWx3, 0..255) without noise."""
    grid = np.array(
        [[[rng.uniform(20, 235) for _ in range(3)] for _ in range(5)] for _ in range(4)],
        dtype=np.uint8,
    )
    base = Image.fromarray(grid, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(rng.randint(6, 14)):
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
        w, h = rng.uniform(0.05, 0.5) * width, rng.uniform(0.05, 0.5) * height
        color = tuple(rng.randint(0, 255) for _ in range(3))
        box = (x0, y0, x0 + w, y0 + h)
        shape = rng.choice(("ellipse", "rectangle", "polygon"))
        if shape == "ellipse":
            draw.ellipse(box, fill=color)
        elif shape == "rectangle":
            draw.rectangle(box, fill=color)
        else:
            points = [(rng.uniform(x0, x0 + w), rng.uniform(y0, y0 + h)) for _ in range(5)]
            draw.polygon(points, fill=color)
    base = base.filter(ImageFilter.GaussianBlur(radius=max(width, height) / 400))
    return np.asarray(base, dtype=np.float32)


def _encode(scene: np.ndarray, sigma: float, seed: int) -> bytes:
    gen = np.random.default_rng(seed)
    h, w, _ = scene.shape
    # Texture (low-frequency grain) plus per-pixel noise, as in a photo of real surfaces.
    grain = gen.normal(0.0, sigma, (h // 4 + 1, w // 4 + 1, 3)).astype(np.float32)
    grain = np.repeat(np.repeat(grain, 4, axis=0), 4, axis=1)[:h, :w]
    fine = gen.normal(0.0, sigma * 0.6, (h, w, 3)).astype(np.float32)
    pixels = np.clip(scene + grain + fine, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "JPEG", quality=85, optimize=True)
    return out.getvalue()


def make_photo(seed: int) -> bytes:
    """One photo-like JPEG of 100-400 KB (deterministic for a seed)."""
    rng = random.Random(seed)
    long_side = rng.randint(640, 1600)
    aspect = rng.choice(_ASPECTS)
    width, height = (
        (long_side, round(long_side / aspect))
        if aspect >= 1
        else (round(long_side * aspect), long_side)
    )
    scene = _scene(rng, width, height)
    target = rng.uniform(MIN_BYTES * 1.3, MAX_BYTES * 0.85)
    sigma, data = 6.0, b""
    for _ in range(12):
        data = _encode(scene, sigma, seed)
        if MIN_BYTES <= len(data) <= MAX_BYTES and abs(len(data) - target) < 0.25 * target:
            break
        # JPEG size grows roughly linearly with the noise amplitude at these levels.
        sigma = float(np.clip(sigma * (target / max(len(data), 1)) ** 1.2, 0.5, 80.0))
    return data


def photos(count: int) -> list[Path]:
    """``count`` cached photo-like JPEGs (built on first use)."""
    directory = CACHE / f"images-{_IMAGES_VERSION}"
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"photo-{i:04d}.jpg"
        if not path.is_file():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(make_photo(1000 + i))
            tmp.replace(path)
        paths.append(path)
    return paths


SPECIAL = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BASE_VOCAB = 30522  # bert-base-uncased; BLIP adds [DEC] and [ENC] -> 30524


ARCHS = ("base", "large")


def blip_random(arch: str = "base", seed: int = 0, *, head: str = "caption") -> Path:
    """A cached full-size BLIP captioning checkpoint with random weights.

    ``base``: ViT-B/16 at 384 px + BERT-base (Salesforce/blip-image-captioning-base);
    ``large``: ViT-L/16 at 384 px (1024 wide, 24 layers) + the same text model with
    1024-wide cross-attention (Salesforce/blip-image-captioning-large).
    ``head="vqa"``: the question-answering model of that size instead (BlipForQuestionAnswering,
    Salesforce/blip-vqa-base: a text encoder and an answer decoder over the same vision model).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, not {arch!r}")
    if head not in ("caption", "vqa"):
        raise ValueError(f"head must be 'caption' or 'vqa', not {head!r}")
    kind = "" if head == "caption" else f"{head}-"
    directory = CACHE / f"blip-{arch}-{kind}random-{_MODEL_VERSION}-s{seed}"
    if (directory / "config.json").is_file() and (directory / "model.safetensors").is_file():
        return directory
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipForQuestionAnswering,
        BlipProcessor,
    )
    from transformers.models.blip import BlipImageProcessorPil

    CACHE.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix="building-", dir=CACHE))
    words = [f"w{i}" for i in range(BASE_VOCAB - len(SPECIAL))]
    (building / "vocab.txt").write_text("\n".join(SPECIAL + words) + "\n")
    tokenizer = BertTokenizer(
        vocab=str(building / "vocab.txt"),
        do_lower_case=True,
        bos_token="[DEC]",
        additional_special_tokens=["[ENC]"],
    )
    config = BlipConfig()  # BLIP-base: ViT-B/16 @ 384 + BERT-base, vocab 30524
    if arch == "large":
        vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24}
        config = BlipConfig(
            vision_config={**vision, "num_attention_heads": 16},
            text_config={"encoder_hidden_size": 1024},
        )
    ids = tokenizer.convert_tokens_to_ids
    assert len(tokenizer) == config.text_config.vocab_size == 30524
    assert ids("[DEC]") == config.text_config.bos_token_id
    assert ids("[SEP]") == config.text_config.sep_token_id
    assert ids("[PAD]") == config.text_config.pad_token_id
    torch.manual_seed(seed)
    model_class = BlipForConditionalGeneration if head == "caption" else BlipForQuestionAnswering
    model = model_class(config).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(), tokenizer=tokenizer)
    model.save_pretrained(building)
    processor.save_pretrained(building)
    if directory.exists():
        shutil.rmtree(directory)
    building.rename(directory)
    return directory
