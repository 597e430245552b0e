"""Zero-shot moderation: policies (YAML), the BLIP retrieval recipe, and the decision.

A policy names categories, each described by a few text prompts and carrying a review and a
block threshold. Scoring follows BLIP's retrieval recipe:

1. every prompt of a policy is text-encoded once (ITC features, cached per policy);
2. an image is vision-encoded once; its ITC cosine against every prompt picks a shortlist of the
   ``k`` closest prompts;
3. only the shortlisted prompts are re-ranked with the ITM head (the text encoder attending to
   the image); a category's score is the highest ITM probability among its shortlisted prompts
   (0 when none made the shortlist), and a parent's score is the maximum of its own and its
   descendants';
4. a category is flagged ``block`` at or above its block threshold, else ``review`` at or above
   its review threshold; the decision is ``block`` if any category blocks, else ``review`` if any
   asks for review, else ``allow``.

Policies are validated when the worker starts (``load_policies``): an error names the file and
the field. Everything above the torch section is pure logic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch.nn.functional import normalize

from producer.protocol.jobs import CategoryScore, ModerationOutput

Flag = Literal["none", "review", "block"]
Decision = Literal["allow", "review", "block"]

MAX_PROMPTS = 1024
"""Most prompts one policy may hold (all encoded once; ``k`` per image are re-ranked)."""


class PolicyError(ValueError):
    """A policy file is missing, not YAML, or invalid; the message names the file and field."""


class Category(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    name: str = Field(min_length=1, max_length=100)
    parent: str | None = Field(default=None, min_length=1, max_length=100)
    description: str | None = None
    prompts: list[str] = Field(
        default_factory=list,
        description="Texts that describe the category; a parent with children may have none.",
    )
    review_threshold: float = Field(ge=0.0, le=1.0)
    block_threshold: float = Field(ge=0.0, le=1.0)

    @field_validator("prompts")
    @classmethod
    def _no_blank_prompts(cls, value: list[str]) -> list[str]:
        prompts = [prompt.strip() for prompt in value]
        blank = [index for index, prompt in enumerate(prompts) if not prompt]
        if blank:
            raise ValueError(f"prompt {blank[0]} is empty")
        return prompts

    @model_validator(mode="after")
    def _thresholds_in_order(self) -> Category:
        if self.review_threshold > self.block_threshold:
            raise ValueError(
                f"review_threshold ({self.review_threshold}) must not exceed "
                f"block_threshold ({self.block_threshold})"
            )
        return self


class Policy(BaseModel):
    """One moderation policy, as written in its YAML file."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    name: str = Field(min_length=1, max_length=100)
    version: str = Field(min_length=1, max_length=100)
    model: str = Field(min_length=1, max_length=100, description="ITM model the policy is for.")
    description: str | None = None
    k: int = Field(ge=1, le=MAX_PROMPTS, description="Prompts shortlisted by ITC per image.")
    categories: list[Category] = Field(min_length=1)

    @field_validator("version", mode="before")
    @classmethod
    def _version_as_text(cls, value: object) -> object:
        # `version: 3` or `version: 2024-06-01` in YAML is not a string; keep it as written.
        return (
            str(value) if isinstance(value, int | float) or hasattr(value, "isoformat") else value
        )

    @model_validator(mode="after")
    def _check_tree(self) -> Policy:
        names = [category.name for category in self.categories]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"{_where(i, name)}.name: duplicate category name {name!r}")
        parents = {category.parent for category in self.categories}
        for i, category in enumerate(self.categories):
            if category.parent is not None and category.parent not in names:
                raise ValueError(
                    f"{_where(i, category.name)}.parent: {category.parent!r} is not a category "
                    f"of this policy (categories: {names})"
                )
            if not category.prompts and category.name not in parents:
                raise ValueError(
                    f"{_where(i, category.name)}.prompts: empty (only a parent category may "
                    "have no prompts of its own)"
                )
        for i, category in enumerate(self.categories):
            cycle = self._cycle_from(category.name)
            if cycle:
                raise ValueError(f"{_where(i, category.name)}.parent: parents form a cycle {cycle}")
        if len(self.prompts) > MAX_PROMPTS:
            raise ValueError(f"categories: {len(self.prompts)} prompts; at most {MAX_PROMPTS}")
        return self

    def _cycle_from(self, start: str) -> list[str]:
        parent_of = {category.name: category.parent for category in self.categories}
        seen = [start]
        node = parent_of[start]
        while node is not None:
            if node in seen:
                return [*seen, node]
            seen.append(node)
            node = parent_of[node]
        return []

    @property
    def prompts(self) -> list[str]:
        """Every prompt of the policy, category by category (the order of the prompt features)."""
        return [prompt for category in self.categories for prompt in category.prompts]

    @property
    def prompt_owners(self) -> list[int]:
        """For each prompt of ``prompts``, the index of its category."""
        return [i for i, category in enumerate(self.categories) for _ in category.prompts]


# --- loading -------------------------------------------------------------------------------------


def load_policy(path: str | Path, name: str | None = None) -> Policy:
    """Read and validate one policy file; ``name``: the name jobs use (must match the file's)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyError(f"policy file {path}: cannot be read ({exc})") from exc
    except yaml.YAMLError as exc:
        raise PolicyError(f"policy file {path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise PolicyError(f"policy file {path}: expected a mapping at the top, got {raw!r:.60}")
    try:
        policy = Policy.model_validate(raw)
    except ValidationError as exc:
        raise PolicyError(f"policy file {path}: {_describe(exc, raw)}") from exc
    if name is not None and policy.name != name:
        raise PolicyError(
            f"policy file {path}: name is {policy.name!r} but it is configured as {name!r}; "
            "make them equal"
        )
    return policy


def load_policies(paths: Mapping[str, str | Path]) -> dict[str, Policy]:
    """Load every configured policy (name -> YAML path); the first invalid one raises."""
    return {name: load_policy(path, name) for name, path in paths.items()}


def _describe(exc: ValidationError, raw: dict[str, Any]) -> str:
    """Errors as `field: message`, naming categories by name rather than by position."""
    parts = []
    for err in exc.errors()[:5]:
        loc = list(err["loc"])
        where: list[str] = []
        for index, part in enumerate(loc):
            if index == 1 and loc[0] == "categories" and isinstance(part, int):
                where[-1] = f"categories[{part}]{_category_label(raw, part)}"
                continue
            where.append(str(part))
        message = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{'.'.join(where)}: {message}" if where else message)
    return "; ".join(parts)


def _where(index: int, name: str) -> str:
    return f"categories[{index}] ({name!r})"


def _category_label(raw: dict[str, Any], index: int) -> str:
    categories = raw.get("categories")
    if isinstance(categories, list) and index < len(categories):
        entry = categories[index]
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            return f" ({entry['name']!r})"
    return ""


# --- the decision (pure) -------------------------------------------------------------------------


def flag(score: float, review_threshold: float, block_threshold: float) -> Flag:
    if score >= block_threshold:
        return "block"
    if score >= review_threshold:
        return "review"
    return "none"


def decide(flags: Sequence[Flag]) -> Decision:
    if "block" in flags:
        return "block"
    if "review" in flags:
        return "review"
    return "allow"


def own_scores(policy: Policy, shortlisted: Mapping[int, float]) -> list[float]:
    """Each category's own score: the best ITM probability of its shortlisted prompts, else 0.

    ``shortlisted`` maps prompt indices (into ``policy.prompts``) to their ITM probability.
    """
    owners = policy.prompt_owners
    scores = [0.0] * len(policy.categories)
    for prompt, probability in shortlisted.items():
        owner = owners[prompt]
        scores[owner] = max(scores[owner], probability)
    return scores


def rolled_up(policy: Policy, own: Sequence[float]) -> list[float]:
    """A category's score is the maximum of its own and all its descendants' own scores."""
    index = {category.name: i for i, category in enumerate(policy.categories)}
    scores = list(own)
    for i, category in enumerate(policy.categories):
        parent = category.parent
        while parent is not None:
            j = index[parent]
            scores[j] = max(scores[j], own[i])
            parent = policy.categories[j].parent
    return scores


def moderate(policy: Policy, shortlisted: Mapping[int, float]) -> ModerationOutput:
    """The output for one image from the ITM probabilities of its shortlisted prompts."""
    scores = rolled_up(policy, own_scores(policy, shortlisted))
    categories = [
        CategoryScore(
            name=category.name,
            parent=category.parent,
            score=score,
            review_threshold=category.review_threshold,
            block_threshold=category.block_threshold,
            flagged=flag(score, category.review_threshold, category.block_threshold),
        )
        for category, score in zip(policy.categories, scores, strict=True)
    ]
    return ModerationOutput(
        policy=policy.name,
        version=policy.version,
        decision=decide([c.flagged for c in categories]),
        categories=categories,
    )


# --- scoring with a BlipForImageTextRetrieval model (torch) --------------------------------------


@dataclass(frozen=True, slots=True)
class PromptBank:
    """A policy's prompts, tokenized and ITC-encoded once; reused for every image."""

    input_ids: torch.Tensor  # (P, W) padded to the longest prompt, on the model's device
    attention_mask: torch.Tensor  # (P, W)
    features: torch.Tensor  # (P, D) normalized text_proj of [CLS], float32


def encode_prompts(
    model: Any, tokenizer: Any, prompts: Sequence[str], device: torch.device
) -> PromptBank:
    """Tokenize and text-encode every prompt in one pass (unimodal text encoder, ITC head)."""
    rows = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    width = max(len(row) for row in rows)
    pad = int(tokenizer.pad_token_id or 0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row)
        mask[index, : len(row)] = 1
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode():
        states = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        features = normalize(model.text_proj(states[:, 0, :]).float(), dim=-1)
    return PromptBank(ids, mask, features)


def shortlist_scores(
    model: Any, bank: PromptBank, image_embeds: torch.Tensor, k: int
) -> list[dict[int, float]]:
    """Per image: {prompt index: ITM probability} for its ``k`` closest prompts by ITC cosine.

    ``image_embeds`` is the vision encoder's last hidden state for a batch of images (B, N, H):
    each image is encoded once, and only ``B x k`` (prompt, image) pairs run the ITM head.
    """
    k = min(k, bank.features.shape[0])
    image_feat = normalize(model.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)
    similarity = image_feat @ bank.features.T  # (B, P)
    top = similarity.topk(k, dim=1).indices  # (B, k), best first
    rows = top.reshape(-1)
    encoder_states = image_embeds.repeat_interleave(k, dim=0)
    states = model.text_encoder(
        input_ids=bank.input_ids[rows],
        attention_mask=bank.attention_mask[rows],
        encoder_hidden_states=encoder_states,
        encoder_attention_mask=torch.ones(
            encoder_states.shape[:-1], dtype=torch.long, device=encoder_states.device
        ),
    ).last_hidden_state
    itm = model.itm_head(states[:, 0, :]).float().softmax(dim=-1)[:, 1].view(-1, k)
    return [
        dict(zip(indices, probabilities, strict=True))
        for indices, probabilities in zip(top.cpu().tolist(), itm.cpu().tolist(), strict=True)
    ]
