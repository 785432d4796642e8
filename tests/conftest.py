"""Shared fixtures: tiny random models (built from configs, with real tokenizers) and small data files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import chat_rows, write_jsonl

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: on the shared 2-core test machines two OpenMP threads spin against other processes
# (a 128x64 @ 64x64 matmul took 3.4 ms with 2 threads vs 0.06 ms with 1 under load).
torch.set_num_threads(1)


@pytest.fixture
def tiny_llama():
    """(model, tokenizer): a 2-layer random Llama with the SmolLM2 tokenizer (identical every build)."""
    from deltatune.models import load_model

    return load_model("tiny-llama")


@pytest.fixture
def tiny_bert():
    from deltatune.models import load_model

    return load_model("tiny-bert", task="base")


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", chat_rows())


@pytest.fixture
def tiny_config(chat_file: Path, tmp_path: Path):
    """A RunConfig for a few LoRA SFT steps of tiny-llama; pass overrides to adjust."""
    from deltatune.config import load_config

    def make(*overrides: str):
        return load_config(
            None,
            [
                "model=tiny-llama",
                f"data.train={chat_file}",
                "data.eval_split=0.2",
                "data.max_length=64",
                "train.max_steps=4",
                "train.batch_size=4",
                "train.lr=1e-2",
                "delta.dropout=0.0",
                f"output_dir={tmp_path / 'run'}",
                *overrides,
            ],
        )

    return make
