"""BLIP image-text matching (BlipForImageTextRetrieval): ITM probability and ITC cosine.

The image is encoded once per item, however many texts it is matched against; all texts of a
batch run through the text encoder together (self-attention masks padding correctly; the image
side is never padded, so the cross-attention mask BLIP ignores does not matter here).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch.nn.functional import normalize

from producer.jobs import MatchJob, MatchOutput, MatchScore
from worker.models.base import ModelRunner, load_blip_processor, pixel_values, stack_pixels


@dataclass(frozen=True, slots=True)
class MatchItem:
    pixel_values: torch.Tensor
    token_ids: list[list[int]]  # one unpadded list per text
    job: MatchJob


@dataclass(frozen=True, slots=True)
class Matched:
    output: MatchOutput


class MatchRunner(ModelRunner[MatchJob]):
    kinds = ("match",)

    def load(self) -> None:
        from transformers import BlipForImageTextRetrieval

        self.processor, self.image_processor = load_blip_processor(self.spec.source)
        self.tokenizer = self.processor.tokenizer
        model = BlipForImageTextRetrieval.from_pretrained(
            self.spec.source, dtype=self.placement.dtype
        )
        self.model = model.to(self.placement.device).eval()

    def prepare(self, job: MatchJob, image: Image.Image) -> MatchItem:
        ids = [self.tokenizer(text)["input_ids"] for text in job.texts]
        return MatchItem(pixel_values(self.image_processor, image), ids, job)

    def group_key(self, item: MatchItem) -> Hashable:
        return (self.name,)

    def run_batch(self, items: list[MatchItem]) -> Sequence[Matched]:
        with torch.inference_mode():
            itm, itc = self._scores(items)
        results, start = [], 0
        for item in items:
            end = start + len(item.token_ids)
            scores = [
                MatchScore(text=text, itm=float(p), itc=float(c))
                for text, p, c in zip(item.job.texts, itm[start:end], itc[start:end], strict=True)
            ]
            results.append(Matched(MatchOutput(scores=scores)))
            start = end
        return results

    def _scores(self, items: list[MatchItem]) -> tuple[list[float], list[float]]:
        model, device = self.model, self.placement.device
        pixels = stack_pixels([item.pixel_values for item in items], self.placement)
        image_embeds = model.vision_model(pixel_values=pixels).last_hidden_state
        owner = torch.tensor(
            [i for i, item in enumerate(items) for _ in item.token_ids], device=device
        )
        input_ids, mask = self._pad([ids for item in items for ids in item.token_ids])
        per_text = image_embeds[owner]
        itm_states = model.text_encoder(
            input_ids=input_ids,
            attention_mask=mask,
            encoder_hidden_states=per_text,
            encoder_attention_mask=torch.ones(per_text.shape[:-1], dtype=torch.long, device=device),
        ).last_hidden_state
        itm = model.itm_head(itm_states[:, 0, :]).float().softmax(dim=-1)[:, 1]
        text_states = model.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        image_feat = normalize(model.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)
        text_feat = normalize(model.text_proj(text_states[:, 0, :]).float(), dim=-1)
        itc = (image_feat[owner] * text_feat).sum(dim=-1)
        return itm.cpu().tolist(), itc.cpu().tolist()

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(row) for row in rows)
        pad = int(self.tokenizer.pad_token_id or 0)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            ids[index, : len(row)] = torch.tensor(row)
            mask[index, : len(row)] = 1
        device = self.placement.device
        return ids.to(device), mask.to(device)

    def warmup(self) -> None:
        job = MatchJob(image="s3://warm-up/x.jpg", model=self.name, texts=["a", "a grey square"])
        self.run_batch([self.prepare(job, Image.new("RGB", (64, 64), (200, 200, 200)))])
