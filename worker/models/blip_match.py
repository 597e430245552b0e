"""BLIP image-text matching (BlipForImageTextRetrieval): ITM probability and ITC cosine.

The image is encoded once per item, however many texts it is matched against; all texts of a
batch run through the text encoder together (self-attention masks padding correctly; the image
side is never padded, so the cross-attention mask BLIP ignores does not matter here).

The same model serves moderation jobs (``worker.models.moderation``): a policy's prompts are
text-encoded once and cached here; each image is encoded once, shortlisted by ITC and re-ranked
by ITM.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.nn.functional import normalize

from producer.protocol.errors import JobFailure
from producer.protocol.jobs import (
    ErrorCode,
    MatchJob,
    MatchOutput,
    MatchScore,
    ModerationJob,
    ModerationOutput,
)
from worker.models import moderation
from worker.models.base import (
    ModelRunner,
    Placement,
    check_tokens,
    load_blip_processor,
    stack_pixels,
    text_positions,
)
from worker.settings import ModelSpec, Settings


@dataclass(frozen=True, slots=True)
class MatchItem:
    pixel_values: torch.Tensor
    token_ids: list[list[int]]  # one unpadded list per text
    texts: list[str]


@dataclass(frozen=True, slots=True)
class Matched:
    output: MatchOutput


@dataclass(frozen=True, slots=True)
class ModerationItem:
    pixel_values: torch.Tensor
    policy: moderation.Policy
    job: ModerationJob


@dataclass(frozen=True, slots=True)
class Moderated:
    output: ModerationOutput


class MatchRunner(ModelRunner[MatchJob | ModerationJob]):
    kinds = ("match", "moderate")

    def __init__(self, spec: ModelSpec, placement: Placement) -> None:
        super().__init__(spec, placement)
        self.policies: dict[str, moderation.Policy] = {}
        self._prompt_banks: dict[str, moderation.PromptBank] = {}
        self.model: Any = None  # loaded by load_model (not in an intake process)

    def load_prepare(self) -> None:
        from transformers import BlipConfig

        self.processor, self.image_processor = load_blip_processor(self.spec.source)
        self.tokenizer = self.processor.tokenizer
        self.config = BlipConfig.from_pretrained(self.spec.source)

    def load_model(self) -> None:
        from transformers import BlipForImageTextRetrieval

        model = BlipForImageTextRetrieval.from_pretrained(
            self.spec.source, dtype=self.placement.dtype
        )
        self.model = model.to(self.placement.device).eval()
        self._prompt_banks = {}

    def bind(self, peers: Mapping[str, ModelRunner[Any]], settings: Settings) -> None:
        super().bind(peers, settings)
        # At worker start: every configured policy is validated (a bad file stops the worker).
        self.use_policies(moderation.load_policies(settings.policy_map()))

    def use_policies(self, policies: Mapping[str, moderation.Policy]) -> None:
        """Serve these policies; encode the prompts of those written for this model now (where
        the model is loaded: an intake process only checks a job's policy)."""
        self.policies = dict(policies)
        self._prompt_banks = {}
        for policy in self.policies.values():
            if policy.model == self.name and self.model is not None:
                self.prompt_bank(policy)

    def prompt_bank(self, policy: moderation.Policy) -> moderation.PromptBank:
        """The policy's prompt features, encoded on first use and cached (model thread)."""
        bank = self._prompt_banks.get(policy.name)
        if bank is None:
            bank = moderation.encode_prompts(
                self.model, self.tokenizer, policy.prompts, self.placement.device
            )
            self._prompt_banks[policy.name] = bank
        return bank

    def prepare(
        self, job: MatchJob | ModerationJob, image: Image.Image
    ) -> MatchItem | ModerationItem:
        if isinstance(job, ModerationJob):
            return ModerationItem(self.pixels(self.image_processor, image), self._policy(job), job)
        ids = [self.tokenizer(text)["input_ids"] for text in job.texts]
        limit = text_positions(self.config)
        for index, text_ids in enumerate(ids):
            check_tokens(self.name, f"text {index}", len(text_ids), limit, "shorten it")
        return MatchItem(self.pixels(self.image_processor, image), ids, list(job.texts))

    def _policy(self, job: ModerationJob) -> moderation.Policy:
        policy = self.policies.get(job.policy)
        if policy is None:
            raise JobFailure(
                f"unknown moderation policy {job.policy!r}; known policies: "
                f"{sorted(self.policies)}",
                code=ErrorCode.INVALID_JOB,
            )
        if policy.model != self.name:
            raise JobFailure(
                f"policy {policy.name!r} is written and calibrated for model {policy.model!r}, "
                f"not {self.name!r}: submit it with model={policy.model!r}",
                code=ErrorCode.INVALID_JOB,
            )
        return policy

    def group_key(self, item: MatchItem | ModerationItem) -> Hashable:
        if isinstance(item, ModerationItem):
            return (self.name, "moderate", item.policy.name)
        return (self.name,)

    def run_batch(self, items: Sequence[MatchItem | ModerationItem]) -> Sequence[Any]:
        moderations = [item for item in items if isinstance(item, ModerationItem)]
        matches = [item for item in items if isinstance(item, MatchItem)]
        if moderations and matches:
            raise ValueError("match and moderation items in one batch (their group keys differ)")
        return self._moderate(moderations) if moderations else self._match(matches)

    def _moderate(self, items: list[ModerationItem]) -> list[Moderated]:
        policy = items[0].policy
        # Equal, not identical: in a split worker's model process each item brings its own copy.
        if any(item.policy != policy for item in items):
            raise ValueError("moderation items of different policies in one batch")
        with torch.inference_mode():
            bank = self.prompt_bank(policy)
            pixels = stack_pixels([item.pixel_values for item in items], self.placement)
            image_embeds = self.model.vision_model(pixel_values=pixels).last_hidden_state
            shortlists = moderation.shortlist_scores(self.model, bank, image_embeds, policy.k)
        return [Moderated(moderation.moderate(policy, shortlist)) for shortlist in shortlists]

    def _match(self, items: list[MatchItem]) -> list[Matched]:
        return [
            Matched(
                MatchOutput(
                    scores=[
                        MatchScore(text=text, itm=itm, itc=itc)
                        for text, (itm, itc) in zip(item.texts, scored, strict=True)
                    ]
                )
            )
            for item, scored in zip(items, self._score_items(items), strict=True)
        ]

    def score(
        self, pixels: Sequence[torch.Tensor], texts: Sequence[Sequence[str]]
    ) -> list[list[tuple[float, float]]]:
        """(ITM match probability, ITC cosine) of each image's texts, in one forward pass.
        ``pixels``: prepared by this runner's image processor. Model thread only."""
        items = [
            MatchItem(p, [self.tokenizer(text)["input_ids"] for text in ts], list(ts))
            for p, ts in zip(pixels, texts, strict=True)
        ]
        return self._score_items(items)

    def _score_items(self, items: list[MatchItem]) -> list[list[tuple[float, float]]]:
        with torch.inference_mode():
            itm, itc = self._scores(items)
        scored, start = [], 0
        for item in items:
            end = start + len(item.token_ids)
            scored.append(list(zip(itm[start:end], itc[start:end], strict=True)))
            start = end
        return scored

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
