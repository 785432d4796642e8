"""P-tuning v2 (Liu et al. 2022, arXiv:2110.07602): deep prompts, trainable in every layer.

Where prompt tuning and P-tuning put virtual tokens in the input only, P-tuning v2 gives every
layer its own continuous prompt, implemented (as in the paper's code) as k trainable keys and
values in front of each attention layer's. Unlike prefix tuning it trains them directly, with no
reparameterisation (the paper finds the MLP's benefit task-dependent), with dropout on the prompt
(the paper's code: the model's hidden dropout, 0.1), and targets understanding tasks as well as
generation: the sequence keeps its length and positions, so a [CLS] classifier or a per-token
(NER) head on top reads the real tokens unchanged. Compose with `head` for a new task head:
`delta: [{method: ptuning2}, {method: head}]`.

The computation is prefix tuning without projection (deltas/prefix.py, deltas/kv_prefix.py), so
it starts from real tokens' keys and values the same way (`init`; `random` is the paper code's
N(0, 1)), and it is saved in PEFT's PREFIX_TUNING layout with `prefix_projection: false` (loadable by PEFT),
and such an adapter loads back here as `prefix` with `projection: false`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from deltatune.deltas.prefix import Prefix
from deltatune.deltas.prompt import TokenInitConfig

__all__ = ["PTuning2Config", "PTuning2"]


class PTuning2Config(TokenInitConfig):
    method: Literal["ptuning2"] = "ptuning2"
    num_virtual_tokens: int = Field(20, ge=1)
    """Prompt length k per layer (the paper: ~20 for simple classification, up to 100+ for hard
    sequence labelling)."""
    dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout on the deep prompts during training."""


class PTuning2(Prefix):
    """Deep prompt tuning: per-layer keys/values trained directly (see module docstring)."""

    config_class = PTuning2Config
    container = "p_tuning_v2"
    config: PTuning2Config  # type: ignore[assignment]

    @property
    def projection(self) -> bool:
        return False
