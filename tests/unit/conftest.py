from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.tiny import build_caption_model


@pytest.fixture(scope="session")
def tiny_caption_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_caption_model(tmp_path_factory.mktemp("tiny-caption"))


@pytest.fixture(scope="session")
def tiny_vqa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.tiny import build_vqa_model

    return build_vqa_model(tmp_path_factory.mktemp("tiny-vqa"))


@pytest.fixture(scope="session")
def tiny_match_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.tiny import build_match_model

    return build_match_model(tmp_path_factory.mktemp("tiny-match"))


@pytest.fixture(scope="module")
def at_most_two_torch_threads() -> Iterator[None]:
    """Model-heavy modules: 2 torch threads at most (more only oversubscribe a small CI box)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)
