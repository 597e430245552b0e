"""The trained BLIP-2 shapes fixtures give the RIGHT answers through the worker's BLIP-2 runner.

Two families (``tests/fixtures/models/shapes-blip2-opt``: decoder-only OPT;
``shapes-blip2-t5``: encoder-decoder T5), trained by ``tests/fixtures/shapes/train_blip2.py``.
Images come from dataset seeds training never used, are encoded to JPEG/PNG bytes and decoded
back, then go through ``worker.models.blip2.Blip2Runner``: the saved processor, the worker's
prompts (``Question: {q} Answer:`` for OPT, ``Question: {q} Short answer:`` for T5, chat history
``Question: q1 Answer: a1. Question: q2 Answer:``), batching by group key and ``generate``.

Gates (held-out, per family): caption exact match >= 0.98 (plain, and continuing
``a photo of``), VQA >= 0.95, chat turns >= 0.95. And the gates have teeth: a dropped or
reordered chat turn, or a wrong prompt template, fails them.

The same measurements on other dataset seeds, or on other model folders (a training output)::

    python -m tests.unit.test_blip2_shapes_accuracy --seeds 9200101,9200102,9200103 \\
        --seeds 9200201,9200202,9200203 [--models /tmp/out] [--families opt] [--errors]

prints, per family and seed triple (caption, VQA, chat), the rates the gates test and the
errors counted by kind (one torch thread unless ``--threads``).
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from PIL import Image

from producer.protocol.jobs import CaptionJob, CaptionOutput, VqaJob, VqaOutput
from tests.fixtures.shapes import chat, train_blip2, world
from worker.models.base import Placement
from worker.models.blip2 import Blip2Runner, vqa_prompt
from worker.settings import ModelSpec

pytestmark = [
    pytest.mark.slow,  # about 20-40 s of CPU per family on 2 cores
    pytest.mark.usefixtures("at_most_two_torch_threads"),
]

MODELS = Path(__file__).resolve().parents[1] / "fixtures" / "models"
FAMILIES = {"opt": "shapes-blip2-opt", "t5": "shapes-blip2-t5"}
CAPTION_SEED = 9_200_001  # training used dataset seeds 1 (train) and 2 (checkpoints)
VQA_SEED = 9_200_002
CHAT_SEED = 9_200_003
N_CAPTION = 100
N_VQA = 60
N_CHAT = 80
CHAT_TURNS = 3
N_TEMPLATE = 120
BATCH = 32
GATE = {"caption": 0.98, "vqa": 0.95, "chat": 0.95}
DEPENDENT_FLOOR = 0.90  # the follow-ups alone (a third of the chat turns), and reordered chats
URI = "s3://shapes/x.png"
CPU = Placement(torch.device("cpu"), torch.float32)

T = TypeVar("T")
Turn = tuple[str, str]


Seeds = tuple[int, int, int]
GATE_SEEDS: Seeds = (CAPTION_SEED, VQA_SEED, CHAT_SEED)


@cache
def runner(family: str, models: Path = MODELS) -> Blip2Runner:
    name = FAMILIES[family]
    loaded = Blip2Runner(ModelSpec(name=name, source=str(models / name), family="blip2"), CPU)
    loaded.load()
    return loaded


def run(model: Blip2Runner, jobs: Sequence[tuple[Any, Image.Image]]) -> list[Any]:
    """Outputs in job order; items batched by the runner's group key, as the worker does."""
    items = [model.prepare(job, image) for job, image in jobs]
    groups: dict[Any, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[model.group_key(item)].append(index)
    outputs: list[Any] = [None] * len(items)
    for indices in groups.values():
        for chunk in chunks(indices):
            for index, result in zip(
                chunk, model.run_batch([items[i] for i in chunk]), strict=True
            ):
                outputs[index] = result.output
    return outputs


def chunks(items: Sequence[T], size: int = BATCH) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def heldout(seed: int, n: int, two_shapes_every: int = 0) -> list[tuple[world.Scene, Image.Image]]:
    """``n`` held-out images; with ``two_shapes_every``, all but every such one hold two shapes."""
    out = []
    for index in range(n):
        count = 2 if two_shapes_every and index % two_shapes_every else None
        sample = world.sample(seed, index, count)
        out.append((sample.scene, sample.decode()))
    return out


def accuracy(pairs: Sequence[tuple[str, str]]) -> float:
    return sum(truth == got for truth, got in pairs) / len(pairs)


def wrong(pairs: Sequence[tuple[Any, str, str]], k: int = 5) -> list[tuple[Any, str, str]]:
    return [p for p in pairs if p[1] != p[2]][:k]


# --------------------------------------------------------------------------- questions


@cache
def vqa_set(seed: int = VQA_SEED) -> list[tuple[Image.Image, str, str]]:
    rng = random.Random(seed)
    return [(i, q, a) for s, i in heldout(seed, N_VQA) for q, a in world.balanced_questions(s, rng)]


@cache
def chat_set(seed: int = CHAT_SEED) -> list[tuple[world.Scene, Image.Image, list[Turn]]]:
    """One chat of ``CHAT_TURNS`` turns per image (three in four images hold two shapes)."""
    rng = random.Random(seed)
    return [(s, i, chat.episode(rng, s, CHAT_TURNS)) for s, i in heldout(seed, N_CHAT, 4)]


def ask(
    family: str, asked: Sequence[tuple[Image.Image, str, list[Turn]]], models: Path = MODELS
) -> list[str]:
    model = runner(family, models)
    jobs = [
        (VqaJob(image=URI, model=model.name, question=q, history=list(h)), image)
        for image, q, h in asked
    ]
    outputs: list[VqaOutput] = run(model, jobs)
    return [out.answer for out in outputs]


ChatAnswer = tuple[world.Scene, list[Turn], Turn, str]


@cache
def chat_answers(family: str, seed: int = CHAT_SEED, models: Path = MODELS) -> list[ChatAnswer]:
    """Every turn of every chat, asked with the true earlier turns: (scene, history, turn, got)."""
    turns = [
        (scene, image, episode[:k], episode[k])
        for scene, image, episode in chat_set(seed)
        for k in range(len(episode))
    ]
    got = ask(family, [(image, q, h) for _, image, h, (q, _) in turns], models)
    return [(scene, h, turn, g) for (scene, _, h, turn), g in zip(turns, got, strict=True)]


def dependent_turns(answers: Sequence[ChatAnswer]) -> list[ChatAnswer]:
    """The chat turns whose truth depends on the history ("what color is it?", ...)."""
    return [t for t in answers if chat.depends_on_history(t[0], t[1], t[2][0])]


def follow_ups(family: str) -> list[tuple[world.Scene, list[Turn], Turn, str]]:
    """The chat turns whose truth depends on the history ("what color is it?", ...)."""
    return dependent_turns(chat_answers(family))


def needing_history(family: str) -> list[tuple[world.Scene, list[Turn], Turn, str]]:
    """The follow-ups no answer gets right without the history (two shapes that differ)."""
    return [t for t in follow_ups(family) if chat.needs_history(t[0], t[2][0])]


# --------------------------------------------------------------------------- measurements

CAPTION_PROMPT = "a photo of"


def caption_pairs(
    family: str, seed: int = CAPTION_SEED, models: Path = MODELS
) -> dict[str, list[tuple[str, str]]]:
    """(truth, got) of plain captions, prompted captions (the prompt comes back first) and
    their continuations."""
    model = runner(family, models)
    data = heldout(seed, N_CAPTION)
    prompt = CAPTION_PROMPT
    jobs = [(CaptionJob(image=URI, model=model.name), image) for _, image in data]
    jobs += [(CaptionJob(image=URI, model=model.name, prompt=prompt), image) for _, image in data]
    outputs: list[CaptionOutput] = run(model, jobs)
    truth = [world.caption(scene) for scene, _ in data]
    plain = [(t, out.caption) for t, out in zip(truth, outputs[:N_CAPTION], strict=True)]
    prompted = [
        (f"{prompt} {t}", out.caption) for t, out in zip(truth, outputs[N_CAPTION:], strict=True)
    ]
    continued = [(t, out.continuation) for t, out in zip(truth, outputs[N_CAPTION:], strict=True)]
    return {"plain": plain, "prompted": prompted, "continued": continued}


def vqa_kind(question: str, truth: str) -> str:
    """``exists`` (``is there a red circle?``; ``exists_no`` / ``exists_yes`` with ``truth``
    given) or the question's second word (``color``, ``many``, ``shape``...)."""
    if question.startswith("is there"):
        return "exists" if not truth else f"exists_{truth}"
    return question.split()[1]


def vqa_answers(
    family: str, seed: int = VQA_SEED, models: Path = MODELS
) -> list[tuple[str, str, str]]:
    """(question, truth, got) of the VQA set, asked without history."""
    asked = vqa_set(seed)
    got = ask(family, [(image, q, []) for image, q, _ in asked], models)
    return [(q, a, g) for (_, q, a), g in zip(asked, got, strict=True)]


def vqa_per_kind(answers: Sequence[tuple[str, str, str]]) -> dict[str, float]:
    results: dict[str, list[bool]] = defaultdict(list)
    for q, a, g in answers:
        results[vqa_kind(q, "")].append(a == g)
    return {kind: round(sum(v) / len(v), 3) for kind, v in results.items()}


def chat_kind(turn: ChatAnswer) -> str:
    """A chat turn's kind: ``first`` (no history), ``follow_up`` (its truth depends on the
    history), ``two_referents`` (a follow-up after turns about both shapes), ``later`` (any
    other turn after the first); and the question's kind (``vqa_kind``, or the follow-up)."""
    scene, history, (question, truth), _ = turn
    if not history:
        where = "first"
    elif chat.depends_on_history(scene, history, question):
        referents = {chat.referent_of(scene, history[:k]) for k in range(1, len(history) + 1)}
        where = "two_referents" if len(referents - {None}) > 1 else "follow_up"
    else:
        where = "later"
    what = question if question in chat.FOLLOW_UPS else vqa_kind(question, truth)
    return f"{where}: {what}"


def measure(
    family: str, seeds: Seeds = GATE_SEEDS, models: Path = MODELS, errors: int = 0
) -> dict[str, Any]:
    """The rates the gates test, for one family, on the (caption, VQA, chat) dataset seeds,
    and the errors counted by kind (``errors``: that many examples too)."""
    caption_seed, vqa_seed, chat_seed = seeds
    captions = caption_pairs(family, caption_seed, models)
    vqa = vqa_answers(family, vqa_seed, models)
    turns = chat_answers(family, chat_seed, models)
    dependent = dependent_turns(turns)
    wrong_vqa = [(q, a, g) for q, a, g in vqa if a != g]
    wrong_chat = [t for t in turns if t[2][1] != t[3]]
    report: dict[str, Any] = {
        "family": family,
        "seeds": list(seeds),
        "caption": round(accuracy(captions["plain"]), 4),
        "prompted": round(accuracy(captions["prompted"]), 4),
        "vqa": round(accuracy([(a, g) for _, a, g in vqa]), 4),
        "chat": round(accuracy([(t[2][1], t[3]) for t in turns]), 4),
        "follow_ups": round(accuracy([(t[2][1], t[3]) for t in dependent]), 4),
        "vqa_per_kind": vqa_per_kind(vqa),
        "sizes": {"caption": N_CAPTION, "vqa": len(vqa), "chat": len(turns)},
        "vqa_errors": dict(Counter(vqa_kind(q, a) for q, a, _ in wrong_vqa).most_common()),
        "chat_errors": dict(Counter(chat_kind(t) for t in wrong_chat).most_common()),
    }
    if errors:
        report["examples"] = {
            "caption": [p for p in captions["plain"] if p[0] != p[1]][:errors],
            "vqa": wrong_vqa[:errors],
            "chat": [([*h, turn], got) for _, h, turn, got in wrong_chat][:errors],
        }
    return report


def gate_failures(report: dict[str, Any]) -> list[str]:
    """The gates a ``measure`` report misses."""
    rates = {
        "caption": report["caption"],
        "prompted": report["prompted"],
        "vqa": report["vqa"],
        "chat": report["chat"],
    }
    out = [k for k, v in rates.items() if v < GATE[k if k in GATE else "caption"]]
    if min(report["vqa_per_kind"].values()) < 0.90:
        out.append("vqa_per_kind")
    if report["follow_ups"] < DEPENDENT_FLOOR:
        out.append("follow_ups")
    return out


# --------------------------------------------------------------------------- the gates


@pytest.mark.parametrize("family", FAMILIES)
def test_captions_exact_match(family: str) -> None:
    """Plain captions, and the continuation of ``a photo of`` (the prompt comes back first)."""
    pairs = caption_pairs(family)
    plain, prompted, continued = pairs["plain"], pairs["prompted"], pairs["continued"]
    rates = {name: accuracy(p) for name, p in [("plain", plain), ("prompted", prompted)]}
    print(f"{family} caption exact match {rates}")
    assert rates["plain"] >= GATE["caption"], [p for p in plain if p[0] != p[1]][:5]
    assert rates["prompted"] >= GATE["caption"], [p for p in prompted if p[0] != p[1]][:5]
    assert accuracy(continued) == rates["prompted"]


@pytest.mark.parametrize("family", FAMILIES)
def test_vqa_answers(family: str) -> None:
    answers = vqa_answers(family)
    overall = accuracy([(a, g) for _, a, g in answers])
    per_kind = vqa_per_kind(answers)
    print(f"{family} VQA accuracy {overall:.3f} over {len(answers)} questions {per_kind}")
    errors = wrong(answers)
    assert overall >= GATE["vqa"], (overall, per_kind, errors)
    assert min(per_kind.values()) >= 0.90, per_kind


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_turns(family: str) -> None:
    """Each turn asked with the true earlier turns; follow-ups ("what color is it?") included."""
    answers = chat_answers(family)
    overall = accuracy([(turn[1], got) for _, _, turn, got in answers])
    dependent = follow_ups(family)
    on_history = accuracy([(turn[1], got) for _, _, turn, got in dependent])
    needing = needing_history(family)
    print(
        f"{family} chat turns {overall:.3f} over {len(answers)}; "
        f"follow-ups {on_history:.3f} over {len(dependent)}, of which needing the history "
        f"{accuracy([(turn[1], got) for _, _, turn, got in needing]):.3f} over {len(needing)}"
    )
    errors = wrong([([*h, turn], turn[1], got) for _, h, turn, got in answers])
    assert len(dependent) >= 50  # the gate measures chat, not single questions
    assert overall >= GATE["chat"], (overall, errors)
    assert on_history >= DEPENDENT_FLOOR, (on_history, errors)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_one_by_one(family: str) -> None:
    """Captions, prompted captions, VQA questions and chat turns batched by group key give the
    same tokens and outputs as each item run alone (the trained weights, not random ones)."""
    model = runner(family)
    images = [image for _, image in heldout(CAPTION_SEED, 6)]
    jobs: list[tuple[Any, Image.Image]] = [
        (CaptionJob(image=URI, model=model.name), image) for image in images
    ]
    jobs += [(CaptionJob(image=URI, model=model.name, prompt="a photo of"), i) for i in images]
    jobs += [(VqaJob(image=URI, model=model.name, question=q), i) for i, q, _ in vqa_set()[:16]]
    jobs += [
        (VqaJob(image=URI, model=model.name, question=q, history=h), image)
        for _, image, episode in chat_set()[:6]
        for h, (q, _) in [(episode[:k], episode[k]) for k in range(len(episode))]
    ]
    items = [model.prepare(job, image) for job, image in jobs]
    groups: dict[Any, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[model.group_key(item)].append(index)
    assert max(len(g) for g in groups.values()) >= 4 and len(groups) > 3
    batched: list[Any] = [None] * len(items)
    for indices in groups.values():
        for index, result in zip(
            indices, model.run_batch([items[i] for i in indices]), strict=True
        ):
            batched[index] = result
    for item, got in zip(items, batched, strict=True):
        (alone,) = model.run_batch([item])
        assert got.token_ids == alone.token_ids, item.job
        assert got.output == alone.output, item.job


# --------------------------------------------------------------------------- the gates have teeth


@pytest.mark.parametrize("family", FAMILIES)
def test_a_dropped_chat_turn_fails_the_gate(family: str) -> None:
    """The follow-ups that need their history, asked without it: the answers are guesses, and
    the chat gate over all turns fails."""
    needing = needing_history(family)
    assert len(needing) >= 30
    with_history = accuracy([(turn[1], got) for _, _, turn, got in needing])
    got = ask(family, [(scene_image(scene), turn[0], []) for scene, _, turn, _ in needing])
    dropped = accuracy([(turn[1], g) for (_, _, turn, _), g in zip(needing, got, strict=True)])
    answers = chat_answers(family)
    changed = {id(t): g for t, g in zip(needing, got, strict=True)}
    overall = accuracy([(t[2][1], changed.get(id(t), t[3])) for t in answers])
    print(
        f"{family} follow-ups needing the history: {with_history:.3f} with it, {dropped:.3f} "
        f"without; all chat turns with those dropped {overall:.3f}"
    )
    assert dropped < 0.7
    assert overall < GATE["chat"]


@pytest.mark.parametrize("family", FAMILIES)
def test_misordered_chat_turns_change_the_answer(family: str) -> None:
    """Two turns about two shapes, then "what color is it?": swap them and "it" is the other."""
    rng = random.Random(CHAT_SEED + 1)
    cases = []
    for scene, image, _ in chat_set():
        swap = chat.swapped_history(rng, scene)
        if swap is not None:
            history, (question, truth) = swap
            cases.append((image, question, history, truth, scene))
    assert len(cases) >= 40
    right = ask(family, [(image, q, h) for image, q, h, _, _ in cases])
    swapped = ask(family, [(image, q, h[::-1]) for image, q, h, _, _ in cases])
    in_order = accuracy([(c[3], g) for c, g in zip(cases, right, strict=True)])
    reordered = accuracy([(c[3], g) for c, g in zip(cases, swapped, strict=True)])
    follows = accuracy(
        [
            (chat.answer(c[4], c[2][::-1], c[1]) or "", g)
            for c, g in zip(cases, swapped, strict=True)
        ]
    )
    print(
        f"{family} in order {in_order:.3f}; swapped: vs truth {reordered:.3f}, "
        f"vs the swapped truth {follows:.3f}"
    )
    assert in_order >= DEPENDENT_FLOOR
    assert reordered < 0.5  # a worker that reordered history would fail the gate
    assert follows >= DEPENDENT_FLOOR  # the model reads the order, it does not guess


# Prompt templates a buggy worker might send instead of its own. Measured on these fixtures:
# OPT answers only after its own "Answer:" cue (0.15-0.53 otherwise). T5, an encoder-decoder,
# reads the question whatever surrounds it: OPT's "Answer:" cue 0.958, "Q: {q} A:" 0.950,
# "{q} Short answer:" 0.958, "Question: {q}" 0.950 (the gate cannot catch those on T5); only the
# bare question fails it clearly (0.59).
WRONG_TEMPLATES = [
    ("opt", "{q}"),  # the bare question
    ("opt", "Question: {q} Short answer:"),  # T5's cue on OPT
    ("opt", "{q} Answer:"),
    ("t5", "{q}"),
]


@cache
def template_accuracy(family: str, template: str) -> float:
    """VQA accuracy with each question put into ``template`` and sent as a caption prompt
    (the first ``N_TEMPLATE`` questions of the VQA set)."""
    model = runner(family)
    asked = vqa_set()[:N_TEMPLATE]
    jobs = [
        (CaptionJob(image=URI, model=model.name, prompt=template.format(q=q), max_new_tokens=10), i)
        for i, q, _ in asked
    ]
    outputs: list[CaptionOutput] = run(model, jobs)
    return accuracy([(a, o.continuation) for (_, _, a), o in zip(asked, outputs, strict=True)])


@pytest.mark.parametrize(("family", "template"), WRONG_TEMPLATES)
def test_a_wrong_prompt_template_fails_the_gate(family: str, template: str) -> None:
    """The VQA questions in a template the model was not trained on (sent as caption prompts,
    which the runner passes as they are): the answers no longer pass the gate. The model's own
    template sent the same way passes it (the runner's VQA path builds exactly that prompt)."""
    own = train_blip2.vqa_prompt("{q}", [], family)
    wrong, right = template_accuracy(family, template), template_accuracy(family, own)
    print(f"{family} VQA as {template!r}: {wrong:.3f}; as {own!r}: {right:.3f}")
    assert right >= GATE["vqa"]
    assert wrong < GATE["vqa"] - 0.1


# --------------------------------------------------------------------------- the fixtures


@pytest.mark.parametrize("family", FAMILIES)
def test_training_prompts_are_the_workers(family: str) -> None:
    t5 = family == "t5"
    history = [("which shape is red?", "the circle"), ("is it on the left?", "yes")]
    for h in ([], history[:1], history):
        assert train_blip2.vqa_prompt("what color is it?", h, family) == vqa_prompt(
            "what color is it?", h, encoder_decoder=t5
        )
    assert runner(family).encoder_decoder is t5
    assert runner(family).num_query_tokens == train_blip2.NUM_QUERY_TOKENS


def test_saved_like_hub_checkpoints() -> None:
    from transformers import Blip2Processor

    total = 0
    for family, name in FAMILIES.items():
        folder = MODELS / name
        processor = Blip2Processor.from_pretrained(folder)
        assert processor.num_query_tokens == train_blip2.NUM_QUERY_TOKENS
        assert processor.image_processor.size == {"height": 96, "width": 96}
        ids = processor.tokenizer("a red circle and a blue square").input_ids
        assert (
            processor.tokenizer.decode(ids, skip_special_tokens=True)
            == "a red circle and a blue square"
        )
        config = runner(family).model.config
        assert config.text_config.model_type == ("t5" if family == "t5" else "opt")
        total += sum(f.stat().st_size for f in folder.iterdir())
    assert total < 30 * 2**20, total


@cache
def _images_by_id() -> dict[int, Image.Image]:
    return {id(scene): image for scene, image, _ in chat_set(CHAT_SEED)}


def scene_image(scene: world.Scene) -> Image.Image:
    return _images_by_id()[id(scene)]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The BLIP-2 shapes gates' rates on any seeds.")
    parser.add_argument(
        "--seeds",
        action="append",
        default=None,
        help="CAPTION,VQA,CHAT dataset seeds (repeatable; default: the gates' own)",
    )
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--models", type=Path, default=MODELS, help="parent of the model folders")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--errors", type=int, default=0, help="examples of errors to print")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    triples = [tuple(int(x) for x in t.split(",")) for t in args.seeds or []] or [GATE_SEEDS]
    for family in args.families.split(","):
        for triple in triples:
            if len(triple) != 3:
                raise SystemExit(f"three seeds, not {triple}")
            seeds: Seeds = (triple[0], triple[1], triple[2])
            report = measure(family, seeds, args.models.resolve(), args.errors)
            report["misses_gates"] = gate_failures(report)
            print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
