"""Fixtures of the CLI tests (helpers live in cli_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.nn as nn
from cli_helpers import hf_model


@pytest.fixture(scope="session")
def saved_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """A tied tiny LLaMA saved in several safetensors shards, with a tokenizer-like extra file."""
    model = hf_model("llama", tie=True)
    path = tmp_path_factory.mktemp("llama") / "tiny-llama"
    model.save_pretrained(path, max_shard_size="40KB")
    (path / "tokenizer.json").write_text('{"version": "1.0"}')
    (path / "extra").mkdir()
    (path / "extra" / "notes.txt").write_text("carried over")
    return model, path
