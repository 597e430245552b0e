"""BLIP-2 (Blip2ForConditionalGeneration): captions, prompted captions, VQA and chat.

One loaded model serves both ``caption`` and ``vqa`` jobs, with either language-model family
BLIP-2 ships with: decoder-only OPT (``Salesforce/blip2-opt-*``) or encoder-decoder Flan-T5
(``Salesforce/blip2-flan-t5-*``).

The language model sees ``num_query_tokens`` image tokens (replaced by the Q-Former's outputs
inside ``generate``) followed by the tokenized prompt, exactly as ``Blip2Processor`` builds it.
Without a prompt, ``generate`` starts from the image tokens and the LM's ``bos_token_id``; this
runner builds the same ids so every item of a batch goes through one code path.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from producer.protocol.errors import JobFailure
from producer.protocol.jobs import CaptionJob, CaptionOutput, ErrorCode, VqaJob, VqaOutput
from worker.models.base import ModelRunner, stack_pixels, strip_pad

MAX_PROMPT_TOKENS = 512
"""Longest prompt accepted, image query tokens included (or the LM's positions, if fewer)."""

Blip2Job = CaptionJob | VqaJob


def answer_label(*, encoder_decoder: bool) -> str:
    """The answer cue of the BLIP-2 VQA prompt: Flan-T5 was tuned on "Short answer:"."""
    return "Short answer" if encoder_decoder else "Answer"


def vqa_prompt(
    question: str, history: Sequence[tuple[str, str]] = (), *, encoder_decoder: bool
) -> str:
    """The BLIP-2 VQA prompt; with history, the chat format of the BLIP-2 blog post.

    ``Question: {q} Answer: {a}.`` per earlier turn, joined by spaces, then
    `` Question: {question} Answer:`` ("Short answer" for Flan-T5).
    """
    label = answer_label(encoder_decoder=encoder_decoder)
    turn = f"Question: {question} {label}:"
    if not history:
        return turn
    context = " ".join(f"Question: {q} {label}: {a}." for q, a in history)
    return f"{context} {turn}"


@dataclass(frozen=True, slots=True)
class Blip2Item:
    pixel_values: torch.Tensor  # (3, H, W), float32, CPU
    input_ids: torch.Tensor  # (L,): image tokens + prompt tokens, as Blip2Processor builds them
    job: Blip2Job
    prompt: str | None  # the text the language model continues (None: plain captioning)


@dataclass(frozen=True, slots=True)
class Blip2Generated:
    output: CaptionOutput | VqaOutput
    token_ids: list[int]
    """The row ``generate`` returned, trailing padding removed (decoder-only: prompt included)."""


class Blip2Runner(ModelRunner[Blip2Job]):
    kinds = ("caption", "vqa")

    def load_prepare(self) -> None:
        from transformers import Blip2Config, Blip2Processor
        from transformers.models.blip import BlipImageProcessorPil

        source = self.spec.source
        self.processor = Blip2Processor.from_pretrained(source)
        # Pinned to the PIL backend, as load_blip_processor does: the default backend depends on
        # whether torchvision is installed, and the two resize differently.
        self.image_processor = BlipImageProcessorPil.from_pretrained(source)
        self.tokenizer = self.processor.tokenizer
        self._tokenizer_lock = threading.Lock()
        self.config = config = Blip2Config.from_pretrained(source)
        text = config.text_config
        self.encoder_decoder = bool(text.is_encoder_decoder)
        # Decoder-only LMs continue the last column: pad on the left. T5's encoder masks padding
        # wherever it is. (Batches never need padding at all: see group_key.)
        self.tokenizer.padding_side = "right" if self.encoder_decoder else "left"
        if config.image_token_index is None:
            raise ValueError(
                f"model {self.name!r}: config.image_token_index is not set; re-save the "
                "checkpoint with a transformers version that knows BLIP-2's image token"
            )
        self.image_token_id = int(config.image_token_index)
        self.num_query_tokens = int(config.num_query_tokens)
        # Without a prompt, generate() feeds the image tokens and then the LM's bos token. A T5
        # text config may not define one (transformers 5's T5Config has no bos_token_id): then
        # the tokenizer's ids of the empty text (T5: the eos token) stand in.
        bos = getattr(text, "bos_token_id", None)
        self.no_prompt_ids = [int(bos)] if bos is not None else self._tokenize("")
        self.pad_token_id = int(text.pad_token_id if text.pad_token_id is not None else 0)
        positions = getattr(text, "max_position_embeddings", None)
        self.lm_positions: int | None = int(positions) if positions else None
        self.max_prompt_tokens = min(MAX_PROMPT_TOKENS, self.lm_positions or MAX_PROMPT_TOKENS)

    def load_model(self) -> None:
        from transformers import Blip2ForConditionalGeneration

        model = Blip2ForConditionalGeneration.from_pretrained(
            self.spec.source, dtype=self.placement.dtype
        )
        self.model = model.to(self.placement.device).eval()

    # --- prompts --------------------------------------------------------------------------------

    def build_prompt(self, job: Blip2Job) -> str | None:
        """The text the language model is given for ``job`` (None: unprompted captioning)."""
        if isinstance(job, VqaJob):
            return vqa_prompt(job.question, job.history, encoder_decoder=self.encoder_decoder)
        return job.prompt

    def encode(self, job: Blip2Job) -> tuple[str | None, torch.Tensor]:
        """The prompt and its input ids (image tokens first); refuse a prompt over the limit."""
        prompt = self.build_prompt(job)
        text_ids = self.no_prompt_ids if prompt is None else self._tokenize(prompt)
        total = self.num_query_tokens + len(text_ids)
        if total > self.max_prompt_tokens:
            raise JobFailure(
                f"the prompt is {total} tokens ({self.num_query_tokens} image query tokens + "
                f"{len(text_ids)} text tokens), over this model's limit of "
                f"{self.max_prompt_tokens} tokens; shorten the "
                f"{'question or the history' if isinstance(job, VqaJob) else 'prompt'}",
                code=ErrorCode.INVALID_JOB,
            )
        positions = self.lm_positions
        if not self.encoder_decoder and positions and total + job.max_new_tokens > positions:
            # A decoder-only LM writes its answer after the prompt, in the same positions.
            room = positions - total
            fix = f"lower max_new_tokens to at most {room}" if room > 0 else "shorten the prompt"
            raise JobFailure(
                f"the prompt ({total} tokens) plus max_new_tokens={job.max_new_tokens} "
                f"exceeds the language model's {positions} positions; {fix}",
                code=ErrorCode.INVALID_JOB,
            )
        ids = [self.image_token_id] * self.num_query_tokens + text_ids
        return prompt, torch.tensor(ids, dtype=torch.long)

    def _tokenize(self, text: str) -> list[int]:
        with self._tokenizer_lock:  # fast tokenizers are not safe to share across threads
            return [int(i) for i in self.tokenizer(text)["input_ids"]]

    # --- the runner -----------------------------------------------------------------------------

    def prepare(self, job: Blip2Job, image: Image.Image) -> Blip2Item:
        if isinstance(job, CaptionJob) and job.candidates:
            raise JobFailure(
                f"model {self.name!r} is a BLIP-2 model: best-of-k candidates are not "
                "supported on it; use candidates=0",
                code=ErrorCode.INVALID_JOB,
            )
        prompt, input_ids = self.encode(job)
        return Blip2Item(self.pixels(self.image_processor, image), input_ids, job, prompt)

    def group_key(self, item: Blip2Item) -> Hashable:
        # Only prompts of the same token length share a batch (the safe choice): such a batch
        # needs no padding at all, so no row depends on the others. Padded rows of
        # different lengths change the shape of every attention reduction (and, for OPT, rely on
        # left padding + positions from the mask). A probe with the tiny CPU test models found
        # padded batches equal too, but that does not carry over to real checkpoints in float16
        # on a GPU, where kernels depend on shapes, so it is not relied on. Different prompts of
        # one token length do share a batch.
        job = item.job
        min_new = job.min_new_tokens if isinstance(job, CaptionJob) else 0
        return (
            self.name,
            job.kind,
            int(item.input_ids.shape[0]),
            job.max_new_tokens,
            min_new,
            job.num_beams,
        )

    def run_batch(self, items: list[Blip2Item]) -> Sequence[Blip2Generated]:
        with torch.inference_mode():
            return self._generate(items)

    def _generate(self, items: list[Blip2Item]) -> list[Blip2Generated]:
        job = items[0].job
        device = self.placement.device
        input_ids, attention_mask = self._pad([item.input_ids for item in items])
        out = self.model.generate(
            pixel_values=stack_pixels([item.pixel_values for item in items], self.placement),
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=job.max_new_tokens,
            min_new_tokens=(job.min_new_tokens if isinstance(job, CaptionJob) else 0) or None,
            num_beams=job.num_beams,
            do_sample=False,
        ).cpu()
        # Decoder-only LMs return the (left-padded) prompt row followed by the new tokens;
        # encoder-decoder LMs return the decoder row: the start token, then the new tokens.
        width = input_ids.shape[1]
        results = []
        for item, row in zip(items, out.tolist(), strict=True):
            if self.encoder_decoder:
                results.append(self._decode(item, row, 1))
            else:
                ids = row[width - len(item.input_ids) :]  # without the left padding
                results.append(self._decode(item, ids, len(item.input_ids)))
        return results

    def _pad(self, rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(int(row.shape[0]) for row in rows)
        ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        left = self.tokenizer.padding_side == "left"
        for index, row in enumerate(rows):
            span = slice(longest - len(row), longest) if left else slice(0, len(row))
            ids[index, span] = row
            mask[index, span] = 1
        return ids, mask

    def _decode(self, item: Blip2Item, ids: list[int], start: int) -> Blip2Generated:
        ids = strip_pad(ids, self.pad_token_id)
        new = self.tokenizer.decode(ids[start:], skip_special_tokens=True).strip()
        job = item.job
        output: CaptionOutput | VqaOutput
        if isinstance(job, VqaJob):
            output = VqaOutput(answer=new, question=job.question)
        elif item.prompt is None:
            output = CaptionOutput(caption=new, continuation=new, prompt=None)
        else:
            if self.encoder_decoder:
                caption = f"{item.prompt} {new}".strip()
            else:  # the whole row decoded (image tokens are special), as BLIP returns captions
                caption = self.tokenizer.decode(
                    ids[self.num_query_tokens :], skip_special_tokens=True
                ).strip()
            output = CaptionOutput(caption=caption, continuation=new, prompt=job.prompt)
        return Blip2Generated(output=output, token_ids=ids)

    def warmup(self) -> None:
        image = Image.new("RGB", (64, 64), (200, 200, 200))
        caption = CaptionJob(image="s3://warm-up/x.jpg", model=self.name, max_new_tokens=2)
        vqa = VqaJob(
            image="s3://warm-up/x.jpg", model=self.name, question="what is it?", max_new_tokens=2
        )
        self.run_batch([self.prepare(caption, image)])
        self.run_batch([self.prepare(vqa, image)])
