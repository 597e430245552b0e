"""Best-of-k captions (CapFilt): the beam caption plus k nucleus samples, ranked by an ITM model.

BLIP's own recipe for bootstrapping captions: sample diverse captions with nucleus sampling
(top_p 0.9), keep them next to the beam-search caption, and let the image-text matching head
decide which describe the image best.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from producer.protocol.errors import JobFailure
from producer.protocol.jobs import ErrorCode, ScoredCaption

TOP_P = 0.9
SAMPLING_SEED = 0
"""Sampling is seeded per batch so the same batch gives the same candidates."""


def resolve_scorer(peers: Any, name: str) -> Any:
    """The served ITM runner called ``name``, or a clear unknown_model failure."""
    scorer = peers.get(name)
    if scorer is None or "match" not in scorer.kinds:
        raise JobFailure(
            f"best-of-k needs the ITM model {name!r} served by this worker "
            f"(BLIPQ_SERVE); served: {sorted(peers)}",
            code=ErrorCode.UNKNOWN_MODEL,
        )
    return scorer


def sample(model: Any, inputs: dict[str, Any], job: Any, count: int) -> torch.Tensor:
    """``count`` nucleus samples per image: (batch * count, length) token ids, on the CPU."""
    torch.manual_seed(SAMPLING_SEED)
    cloned = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    out: torch.Tensor = model.generate(
        **cloned,
        do_sample=True,
        top_p=TOP_P,
        top_k=0,
        num_return_sequences=count,
        max_new_tokens=job.max_new_tokens,
        min_new_tokens=job.min_new_tokens or None,
    )
    return out.cpu()


def rank(
    scorer: Any,
    scorer_pixels: Sequence[torch.Tensor],
    beams: Sequence[str],
    samples: Sequence[Sequence[str]],
) -> list[list[ScoredCaption]]:
    """Deduplicate each image's captions, score them with ITM in one batch, best first."""
    texts_per_image: list[list[tuple[str, str]]] = []
    for beam, sampled in zip(beams, samples, strict=True):
        seen: dict[str, str] = {}
        for text, source in [(beam, "beam"), *((s, "sample") for s in sampled)]:
            if text and text not in seen:
                seen[text] = source
        texts_per_image.append(list(seen.items()) or [(beam, "beam")])
    scores = scorer.score(scorer_pixels, [[t for t, _ in texts] for texts in texts_per_image])
    ranked = []
    for texts, matched in zip(texts_per_image, scores, strict=True):
        scored = [
            ScoredCaption(caption=text, itm=itm, source=source)  # type: ignore[arg-type]
            for (text, source), (itm, _) in zip(texts, matched, strict=True)
        ]
        ranked.append(sorted(scored, key=lambda s: -s.itm))
    return ranked
