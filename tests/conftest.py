"""Shared fixtures. Real servers live in tests/e2e/conftest.py; unit tests need none."""

from __future__ import annotations

import os
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Quiet, offline, deterministic: no hub access is possible here anyway.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The shapes-world fixture models and policies join the worker's model map (explicitly, as a
# deployment names its own model directories); worker subprocesses inherit this.
os.environ.setdefault("BLIPQ_MODEL_DIRS", str(FIXTURES / "models"))
os.environ.setdefault("BLIPQ_POLICY_DIRS", str(FIXTURES / "policies"))
