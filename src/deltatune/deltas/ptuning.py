"""P-tuning (Liu et al. 2021, "GPT Understands, Too", arXiv:2103.10385): virtual tokens produced by
a prompt encoder.

Prompt tuning optimises the k virtual tokens directly; P-tuning instead trains an embedding
table h_0..h_{k-1} and a small network that maps it to the tokens, which makes the tokens depend
on each other and trains more stably:

    P = MLP(BiLSTM(h))        (`encoder: lstm`, the paper's choice: a 2-layer bidirectional LSTM,
                               then Linear-ReLU-Linear)
    P = MLP(h)                (`encoder: mlp`: Linear-ReLU-Linear-ReLU-Linear, PEFT's default)

The layers match PEFT's `PromptEncoder`. The paper places the virtual tokens around anchor words
of a template; like PEFT, deltatune prepends them (the data supplies any template). Only the
encoder's output is saved (PEFT's P_TUNING layout, `prompt_embeddings` [k, hidden]); a loaded
adapter is that table, which keeps training directly if trained further.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.deltas.base import DeltaConfig
from deltatune.deltas.prompt import Prompt, PromptTable, _single_submodule

__all__ = ["PTuningConfig", "PTuning", "PromptEncoder"]


class PTuningConfig(DeltaConfig):
    method: Literal["ptuning"] = "ptuning"
    num_virtual_tokens: int = Field(20, ge=1)
    """Number k of virtual tokens prepended to every sequence."""
    encoder: Literal["lstm", "mlp"] = "lstm"
    """Prompt encoder: `lstm` (bidirectional LSTM + MLP, as in the paper) or `mlp` (3 layers)."""
    encoder_hidden: int | None = Field(None, ge=1)
    """Hidden size of the encoder (default: the model's hidden size)."""
    encoder_layers: int = Field(2, ge=1)
    """LSTM layers (`encoder: lstm`)."""
    encoder_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout between LSTM layers."""


class PromptEncoder(nn.Module):
    """embedding [k, dim] -> encoder -> [k, dim] virtual tokens (PEFT's module and parameter names)."""

    def __init__(self, cfg: PTuningConfig, dim: int, device: torch.device) -> None:
        super().__init__()
        hidden = cfg.encoder_hidden or dim
        self.kind = cfg.encoder
        self.embedding = nn.Embedding(cfg.num_virtual_tokens, dim, device=device)
        if cfg.encoder == "lstm":
            self.lstm_head = nn.LSTM(
                dim, hidden, num_layers=cfg.encoder_layers, dropout=cfg.encoder_dropout if cfg.encoder_layers > 1 else 0.0,
                bidirectional=True, batch_first=True, device=device,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden, device=device), nn.ReLU(), nn.Linear(2 * hidden, dim, device=device)
            )
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden, device=device), nn.ReLU(),
                nn.Linear(hidden, hidden, device=device), nn.ReLU(),
                nn.Linear(hidden, dim, device=device),
            )

    def forward(self) -> torch.Tensor:
        h = self.embedding.weight  # [k, dim]
        if self.kind == "lstm":
            h = self.lstm_head(h.unsqueeze(0))[0].squeeze(0)  # [k, 2 * hidden]
        return self.mlp_head(h)


class PTuning(Prompt):
    """Prompt tuning whose virtual tokens come out of a trained encoder (see module docstring)."""

    config_class = PTuningConfig
    peft_type = "P_TUNING"
    container = "p_tuning"
    config: PTuningConfig

    def build(self, model: nn.Module, embeddings: nn.Embedding) -> nn.Module:
        self.folded = False
        return PromptEncoder(self.config, embeddings.weight.shape[1], embeddings.weight.device)

    def fold(self) -> None:
        """Replace the encoder by its output table (what is saved); a no-op when already folded."""
        if self.folded:
            return
        assert self.model is not None
        table = PromptTable(self.prompt_embeddings().detach().float())
        getattr(self.model, self.container)[self.name] = table
        table.requires_grad_(True)
        self.folded = True

    def load_table(self, value: torch.Tensor) -> None:
        self.fold()
        super().load_table(value)

    def peft_config(self) -> dict[str, Any]:
        cfg = self.config
        return {
            **self.prompt_learning_fields(),
            "encoder_reparameterization_type": cfg.encoder.upper(),
            "encoder_hidden_size": cfg.encoder_hidden or self.hidden,
            "encoder_num_layers": cfg.encoder_layers,
            "encoder_dropout": cfg.encoder_dropout,
        }

    @classmethod
    def config_from_peft(cls, peft: dict[str, Any]) -> PTuningConfig:
        _single_submodule(peft)
        return PTuningConfig(
            num_virtual_tokens=peft["num_virtual_tokens"],
            encoder=str(peft.get("encoder_reparameterization_type", "MLP")).lower(),
            encoder_hidden=peft.get("encoder_hidden_size"),
            encoder_layers=peft.get("encoder_num_layers", 2),
            encoder_dropout=peft.get("encoder_dropout", 0.0),
        )
