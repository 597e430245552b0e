"""A few steps of the fixture-training code on a tiny config: losses go down, saves load."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipProcessor,
)

from tests.fixtures.shapes import train, world

PLAN = train.PLANS["tiny"]
PHASE = train.Phase(steps=25, batch=8, lr=3e-3, warmup=1, log_every=1000)
ROWS = list(range(8))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> train.Context:
    torch.manual_seed(0)
    work = tmp_path_factory.mktemp("shapes-smoke")
    return train.build_context(PLAN, work / "models", work, log=lambda _: None)


def fit(model: torch.nn.Module, step: Callable[[], torch.Tensor]) -> train.Report:
    return train.train_phase("smoke", model, PHASE, step, log=lambda _: None)


def test_tokenizer_ids(ctx: train.Context) -> None:
    tokenizer = ctx.tokenizer
    assert len(tokenizer) == len(train.SPECIAL_TOKENS) + len(world.VOCAB) + 2
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3, 4]) == train.SPECIAL_TOKENS
    assert tokenizer.bos_token_id == tokenizer.convert_tokens_to_ids("[DEC]")
    assert tokenizer.convert_tokens_to_ids("[ENC]") != tokenizer.unk_token_id
    ids = tokenizer("What color is the circle?").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "[CLS]",
        "what",
        "color",
        "is",
        "the",
        "circle",
        "?",
        "[SEP]",
    ]


def test_caption_loss_decreases(ctx: train.Context) -> None:
    model = train.new_model(ctx, BlipForConditionalGeneration, 1)
    aux = train.Aux.build(PLAN)
    stats = fit(
        torch.nn.ModuleList([model, aux.head]),
        lambda: train.caption_step(model, aux, ctx.train, ctx.tables, ROWS),
    )
    assert stats["final_loss"] < 0.7 * stats["first_loss"], stats


def test_vqa_loss_decreases(ctx: train.Context) -> None:
    model = train.new_model(ctx, BlipForQuestionAnswering, 2)
    aux = train.Aux.build(PLAN)
    rng = random.Random(0)
    stats = fit(
        torch.nn.ModuleList([model, aux.head]),
        lambda: train.vqa_step(model, aux, ctx.train, ctx.tables, ROWS, rng, 2),
    )
    assert stats["final_loss"] < 0.7 * stats["first_loss"], stats


def test_match_loss_decreases(ctx: train.Context) -> None:
    model = train.new_model(ctx, BlipForImageTextRetrieval, 3)
    aux = train.Aux.build(PLAN)
    rng = random.Random(0)
    stats = fit(
        torch.nn.ModuleList([model, aux.head]),
        lambda: train.match_step(model, aux, ctx.train, ctx.tables, ROWS, rng, 2),
    )
    assert stats["final_loss"] < 0.9 * stats["first_loss"], stats


def test_end_to_end_saves_loadable_models(tmp_path: Path) -> None:
    train.main(
        ["--out", str(tmp_path), "--plan", "tiny", "--threads", str(torch.get_num_threads())]
    )
    classes = {
        "shapes-caption": BlipForConditionalGeneration,
        "shapes-vqa": BlipForQuestionAnswering,
        "shapes-match": BlipForImageTextRetrieval,
    }
    image = world.sample(0, 0).decode()
    for name, cls in classes.items():
        folder = tmp_path / name
        assert (folder / "model.safetensors").is_file()
        assert (folder / "training_report.json").is_file()
        processor = BlipProcessor.from_pretrained(folder)
        model = cls.from_pretrained(folder)
        assert (
            processor(images=image, return_tensors="pt").pixel_values.shape[-1]
            == PLAN.arch.image_size
        )
        assert model.config.text_config.vocab_size == len(processor.tokenizer)
