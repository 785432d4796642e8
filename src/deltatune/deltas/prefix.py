"""Prefix tuning (Li & Liang 2021, arXiv:2101.00190): trainable keys and values in every layer.

Every attention layer l attends over [P_k^l; K] and [P_v^l; V]: k trainable prefix keys and values
in front of the real tokens' (the prefix acts like k virtual tokens whose activations are free
parameters). Li & Liang found optimising P directly unstable and reparameterise it:

    P = MLP(P')     P' [k, d'] small,  MLP: Linear(d', h) - tanh - Linear(h, layers * 2 * kv_dim)

(`projection: true`, as PEFT's `prefix_projection`). After training only P matters: saving folds
the MLP away and writes P (PEFT's PREFIX_TUNING layout: `prompt_embeddings` [k, layers * 2 *
kv_dim], ordered layer, key/value, head, head_dim). A loaded adapter is that table.

Initialisation (Li & Liang, section 7.2: random initialisation trains poorly and unstably; the
activations of real words work better, task words best): with `init: vocab` (sampled tokens) or
`init: text`, P starts as the keys and values the frozen model computes for those k tokens, so at
step 0 the model behaves as if they were a hard prompt in front of the input. With the projection
this is P = P_0 + MLP(P') with P_0 those activations (fixed) and the MLP's last layer at zero.
`init: random` is PEFT's initialisation (N(0, 1) table, default Linear layers).

The prefix is applied inside the attention function (deltas/kv_prefix.py), not through the KV
cache, so it does not depend on transformers' cache classes and works with `generate`. Grouped-query
models get one prefix per key/value head (kv_dim = kv_heads * head_dim), as in PEFT.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.deltas.kv_prefix import PrefixHost, attention_shape
from deltatune.deltas.prompt import (
    PROMPT_KEY,
    TokenInitConfig,
    VirtualTokenDelta,
    _single_submodule,
    init_token_ids,
)
from deltatune.errors import UserError

__all__ = ["PrefixConfig", "Prefix", "PrefixEncoder"]


class PrefixConfig(TokenInitConfig):
    method: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(20, ge=1)
    """Prefix length k (keys/values added in front of every attention layer)."""
    projection: bool = True
    """Train the prefix through an MLP reparameterisation (Li & Liang), folded away when saving."""
    projection_hidden: int = Field(512, ge=1)
    """Hidden size of the reparameterisation MLP (Li & Liang: 512 for table-to-text, 800 for summarisation)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the prefix keys/values during training."""


class PrefixEncoder(nn.Module):
    """Produces the flat prefix [k, layers * 2 * kv_dim] (PEFT's module and parameter names), plus
    the fixed `offset` P_0 when the projection starts from real activations."""

    def __init__(self, k: int, kv_dim: int, layers: int, projection: bool, hidden: int, device) -> None:
        super().__init__()
        self.projection = projection
        if projection:
            self.embedding = nn.Embedding(k, kv_dim, device=device)
            self.transform = nn.Sequential(
                nn.Linear(kv_dim, hidden, device=device), nn.Tanh(), nn.Linear(hidden, layers * 2 * kv_dim, device=device)
            )
        else:
            self.embedding = nn.Embedding(k, layers * 2 * kv_dim, device=device)
        self.register_buffer("offset", None)

    def start_from(self, flat: torch.Tensor) -> None:
        """Make the output equal `flat` [k, layers * 2 * kv_dim] (a table: its value; a projection:
        offset `flat`, last layer zero)."""
        with torch.no_grad():
            if not self.projection:
                self.embedding.weight.copy_(flat)
                return
            nn.init.zeros_(self.transform[-1].weight)
            nn.init.zeros_(self.transform[-1].bias)
        self.offset = flat.detach().clone()

    def forward(self) -> torch.Tensor:
        weight = self.embedding.weight
        if not self.projection:
            return weight
        out = self.transform(weight)
        return out if self.offset is None else out + self.offset


class Prefix(VirtualTokenDelta):
    """Trainable per-layer key/value prefixes (see module docstring). Not mergeable."""

    config_class = PrefixConfig
    peft_type = "PREFIX_TUNING"
    container = "prefix_tuning"
    host_class = PrefixHost
    config: PrefixConfig

    def prefix_states(self) -> torch.Tensor:
        """[layers, 2, kv_heads, k, head_dim]: keys (index 0) and values (1) of every layer."""
        flat = self.module()()  # [k, layers * 2 * kv_heads * head_dim]
        flat = nn.functional.dropout(flat, self.dropout, training=self.model.training)
        k = self.num_virtual_tokens
        return flat.view(k, self.layers, 2, self.kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)

    @property
    def dropout(self) -> float:
        return self.config.dropout

    @property
    def projection(self) -> bool:
        return self.config.projection

    # ---- building ----------------------------------------------------------------------------------
    def _attach(self, model: nn.Module) -> None:
        self.layers, self.kv_heads, self.head_dim = attention_shape(model)
        self.kv_dim = self.kv_heads * self.head_dim
        self.folded = not self.projection
        device = next(model.parameters()).device
        hidden = getattr(self.config, "projection_hidden", 0)
        encoder = PrefixEncoder(self.num_virtual_tokens, self.kv_dim, self.layers, self.projection, hidden, device)
        host = self._add_module(model, encoder)
        if self.config.init != "random":
            states = host.capture(init_token_ids(model, self.config, self.num_virtual_tokens))  # [L, 2, kvh, k, d]
            encoder.start_from(states.permute(3, 0, 1, 2, 4).reshape(self.num_virtual_tokens, -1).float())

    def fold(self) -> None:
        """Replace the reparameterisation by its output (what is saved); a no-op when folded."""
        if self.folded:
            return
        flat = self.module()().detach().float()
        table = PrefixEncoder(*flat.shape[:1], self.kv_dim, self.layers, False, 0, flat.device)
        with torch.no_grad():
            table.embedding.weight.copy_(flat)
        getattr(self.model, self.container)[self.name] = table
        self.folded = True

    # ---- on disk: PEFT's PREFIX_TUNING layout ------------------------------------------------------
    def import_state(self, stored: dict[str, torch.Tensor], source: str = "adapter") -> None:
        value = stored.get(PROMPT_KEY)
        expected = (self.num_virtual_tokens, self.layers * 2 * self.kv_dim)
        if value is None or tuple(value.shape) != expected:
            got = "no prompt_embeddings" if value is None else f"prompt_embeddings of shape {tuple(value.shape)}"
            raise UserError(
                f"{source}: {got}, expected {expected} ({self.layers} layers x keys and values x {self.kv_dim}); "
                "was the adapter trained on a different base model?"
            )
        self.fold()
        with torch.no_grad():
            self.module().embedding.weight.copy_(value)

    def peft_config(self) -> dict[str, Any]:
        return {
            "peft_type": "PREFIX_TUNING",
            "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": self.kv_dim,
            "num_transformer_submodules": 1,
            "num_attention_heads": self.kv_heads,
            "num_layers": self.layers,
            "encoder_hidden_size": getattr(self.config, "projection_hidden", self.kv_dim),
            "prefix_projection": self.projection,
            "init_weights": None,
            "modules_to_save": None,
        }

    @classmethod
    def config_from_peft(cls, peft: dict[str, Any]) -> PrefixConfig:
        """Our config for a PREFIX_TUNING `adapter_config.json` (ours or PEFT's; P-tuning v2 adapters
        are saved the same way and load as `prefix` with `projection: false`)."""
        _single_submodule(peft)
        return PrefixConfig(
            num_virtual_tokens=peft["num_virtual_tokens"],
            projection=bool(peft.get("prefix_projection", False)),
            init="random",  # the stored weights replace it
            projection_hidden=peft.get("encoder_hidden_size") or 512,
        )
