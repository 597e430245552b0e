"""Download checkpoints into the Hugging Face cache (``HF_HOME``) at image build time.

    python deploy/fetch_models.py caption-base itm-base Salesforce/blip-vqa-base

A name of the worker's default model map (``worker.settings.DEFAULT_MODELS``) stands for its hub
id; anything else is taken as a hub id. Only what ``from_pretrained`` reads is fetched: the JSON
configs, the tokenizer files and the PyTorch weights (safetensors when the repository has them,
else the pickled ``.bin``), never the TensorFlow or Flax copies.
"""

from __future__ import annotations

import sys

from worker.settings import DEFAULT_MODELS

CONFIG_PATTERNS = ["*.json", "*.txt", "*.model"]


def hub_ids(names: list[str]) -> list[str]:
    """The hub id of each name: a default model name maps to its id, anything else is one."""
    return [DEFAULT_MODELS.get(name, name) for name in names]


def weight_patterns(files: list[str]) -> list[str]:
    """The weight files to fetch from a repository listing: safetensors if any, else .bin."""
    if any(name.endswith(".safetensors") for name in files):
        return ["*.safetensors", "*.safetensors.index.json"]
    return ["*.bin", "*.bin.index.json"]


def main(argv: list[str]) -> int:
    from huggingface_hub import HfApi, snapshot_download

    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    api = HfApi()
    for repo_id in hub_ids(argv):
        patterns = CONFIG_PATTERNS + weight_patterns(api.list_repo_files(repo_id))
        path = snapshot_download(repo_id, allow_patterns=patterns)
        print(f"{repo_id} -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
