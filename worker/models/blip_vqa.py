"""BLIP visual question answering (BlipForQuestionAnswering)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from producer.protocol.jobs import VqaJob, VqaOutput
from worker.models.base import (
    ModelRunner,
    check_tokens,
    load_blip_processor,
    stack_pixels,
    strip_pad,
    text_positions,
)


@dataclass(frozen=True, slots=True)
class VqaItem:
    pixel_values: torch.Tensor
    input_ids: torch.Tensor  # (L,)
    job: VqaJob


@dataclass(frozen=True, slots=True)
class Answered:
    output: VqaOutput
    token_ids: list[int]


class VqaRunner(ModelRunner[VqaJob]):
    kinds = ("vqa",)

    def load_prepare(self) -> None:
        from transformers import BlipConfig

        self.processor, self.image_processor = load_blip_processor(self.spec.source)
        self.tokenizer = self.processor.tokenizer
        self.config = BlipConfig.from_pretrained(self.spec.source)

    def load_model(self) -> None:
        from transformers import BlipForQuestionAnswering

        model = BlipForQuestionAnswering.from_pretrained(
            self.spec.source, dtype=self.placement.dtype
        )
        self.model = model.to(self.placement.device).eval()

    def prepare(self, job: VqaJob, image: Image.Image) -> VqaItem:
        ids = self.tokenizer(job.question, return_tensors="pt")["input_ids"][0]
        limit = text_positions(self.config)
        check_tokens(self.name, "the question", int(ids.shape[0]), limit, "shorten it")
        check_tokens(
            self.name,
            f"the answer (its start token and max_new_tokens={job.max_new_tokens})",
            1 + job.max_new_tokens,
            limit,
            "lower max_new_tokens",
        )
        return VqaItem(self.pixels(self.image_processor, image), ids, job)

    def group_key(self, item: VqaItem) -> Hashable:
        # The answer decoder attends to every question position (transformers passes an all-ones
        # mask over the question), so padding would change answers: only questions of the same
        # token length share a batch, and they need no padding at all.
        job = item.job
        return (self.name, int(item.input_ids.shape[0]), job.max_new_tokens, job.num_beams)

    def run_batch(self, items: list[VqaItem]) -> Sequence[Answered]:
        job = items[0].job
        device = self.placement.device
        input_ids = torch.stack([item.input_ids for item in items]).to(device)
        with torch.inference_mode():
            out = self.model.generate(
                pixel_values=stack_pixels([item.pixel_values for item in items], self.placement),
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=job.max_new_tokens,
                num_beams=job.num_beams,
                do_sample=False,
            ).cpu()
        pad = int(self.config.text_config.pad_token_id or 0)
        answers = []
        for item, row in zip(items, out, strict=True):
            ids = strip_pad(row.tolist(), pad)
            text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            answers.append(Answered(VqaOutput(answer=text, question=item.job.question), ids))
        return answers

    def warmup(self) -> None:
        job = VqaJob(image="s3://warm-up/x.jpg", model=self.name, question="what is it?")
        self.run_batch([self.prepare(job, Image.new("RGB", (64, 64), (200, 200, 200)))])
