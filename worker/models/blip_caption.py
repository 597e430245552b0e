"""BLIP captioning (BlipForConditionalGeneration): unconditional and prompted captions."""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from producer.protocol.jobs import CaptionJob, CaptionOutput
from worker.models import capfilt
from worker.models.base import (
    ModelRunner,
    check_tokens,
    load_blip_processor,
    stack_pixels,
    strip_pad,
    text_positions,
)


@dataclass(frozen=True, slots=True)
class CaptionItem:
    pixel_values: torch.Tensor  # (3, H, W), float32, CPU
    job: CaptionJob
    scorer_pixels: torch.Tensor | None = None  # for best-of-k: the ITM model's own preprocessing


@dataclass(frozen=True, slots=True)
class Generated:
    output: CaptionOutput
    token_ids: list[int]


class CaptionRunner(ModelRunner[CaptionJob]):
    kinds = ("caption",)

    def load_prepare(self) -> None:
        from transformers import BlipConfig

        source = self.spec.source
        self.processor, self.image_processor = load_blip_processor(source)
        self.tokenizer = self.processor.tokenizer
        self.config = BlipConfig.from_pretrained(source)
        self._prompts: dict[str, dict[str, torch.Tensor]] = {}
        self._prompts_lock = threading.Lock()

    def load_model(self) -> None:
        from transformers import BlipForConditionalGeneration

        model = BlipForConditionalGeneration.from_pretrained(
            self.spec.source, dtype=self.placement.dtype
        )
        self.model = model.to(self.placement.device).eval()
        self.config = self.model.config

    def group_key(self, item: CaptionItem) -> Hashable:
        job = item.job
        # BLIP's generate drops the last prompt column, so padded prompts of different lengths
        # would decode differently than alone: only identical prompts share a batch.
        return (
            self.name,
            job.prompt,
            job.max_new_tokens,
            job.min_new_tokens,
            job.num_beams,
            job.candidates,
            self._scorer_name(job) if job.candidates else None,
        )

    def _scorer_name(self, job: CaptionJob) -> str:
        default = self.settings.caption_scorer if self.settings else "itm-base"
        return job.scorer or default

    def prepare(self, job: CaptionJob, image: Image.Image) -> CaptionItem:
        prompt_len = 1  # the [DEC] token generate starts from
        if job.prompt is not None:
            prompt_len = int(self._encode_prompt(job.prompt)["input_ids"].shape[1]) - 1
        check_tokens(
            self.name,
            f"the prompt ({prompt_len} tokens) with max_new_tokens={job.max_new_tokens}",
            prompt_len + job.max_new_tokens,
            text_positions(self.config),
            "shorten the prompt or lower max_new_tokens",
        )
        pixels = self.pixels(self.image_processor, image)
        scorer_pixels = None
        if job.candidates:
            scorer = capfilt.resolve_scorer(self.peers, self._scorer_name(job))
            scorer_pixels = scorer.pixels(scorer.image_processor, image)
        return CaptionItem(pixel_values=pixels, job=job, scorer_pixels=scorer_pixels)

    def _encode_prompt(self, prompt: str) -> dict[str, torch.Tensor]:
        with self._prompts_lock:
            encoded = self._prompts.get(prompt)
            if encoded is None:
                tokens = self.tokenizer(prompt, return_tensors="pt")
                encoded = {k: tokens[k] for k in ("input_ids", "attention_mask")}
                self._prompts[prompt] = encoded
            return encoded

    def run_batch(self, items: list[CaptionItem]) -> Sequence[Generated]:
        with torch.inference_mode():
            return self._generate(items)

    def _generate(self, items: list[CaptionItem]) -> list[Generated]:
        job = items[0].job
        device = self.placement.device
        pixels = stack_pixels([item.pixel_values for item in items], self.placement)
        inputs: dict[str, Any] = {"pixel_values": pixels}
        prompt_len = 1  # the [DEC] token generate starts from
        if job.prompt is not None:
            encoded = self._encode_prompt(job.prompt)
            for name, tensor in encoded.items():
                inputs[name] = tensor.repeat(len(items), 1).to(device)
            prompt_len = encoded["input_ids"].shape[1] - 1  # generate drops the last column
        out = self.model.generate(
            **inputs,
            max_new_tokens=job.max_new_tokens,
            min_new_tokens=job.min_new_tokens or None,
            num_beams=job.num_beams,
            do_sample=False,
        )
        results = [self._decode(row.tolist(), prompt_len, job) for row in out.cpu()]
        if job.candidates:
            results = self._best_of_k(items, inputs, results, prompt_len)
        return results

    def _decode(self, ids: list[int], prompt_len: int, job: CaptionJob) -> Generated:
        caption = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        continuation = self.tokenizer.decode(ids[prompt_len:], skip_special_tokens=True).strip()
        output = CaptionOutput(caption=caption, continuation=continuation, prompt=job.prompt)
        return Generated(output=output, token_ids=strip_pad(ids, self._pad_id))

    def _best_of_k(
        self,
        items: list[CaptionItem],
        inputs: dict[str, Any],
        beams: list[Generated],
        prompt_len: int,
    ) -> list[Generated]:
        job = items[0].job
        scorer = capfilt.resolve_scorer(self.peers, self._scorer_name(job))
        sampled = capfilt.sample(self.model, inputs, job, job.candidates)
        texts = [self._decode(row.tolist(), prompt_len, job).output.caption for row in sampled]
        k = job.candidates
        ranked = capfilt.rank(
            scorer,
            [item.scorer_pixels for item in items],  # type: ignore[misc]
            [beam.output.caption for beam in beams],
            [texts[i * k : (i + 1) * k] for i in range(len(items))],
        )
        return [
            Generated(beam.output.model_copy(update={"candidates": r}), beam.token_ids)
            for beam, r in zip(beams, ranked, strict=True)
        ]

    @property
    def _pad_id(self) -> int:
        return int(self.config.text_config.pad_token_id or 0)

    def warmup(self) -> None:
        image = Image.new("RGB", (64, 64), (200, 200, 200))
        job = CaptionJob(image="s3://warm-up/x.jpg", model=self.name, max_new_tokens=2)
        self.run_batch([self.prepare(job, image)])
