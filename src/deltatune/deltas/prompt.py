"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691): k trainable virtual-token embeddings.

The input becomes [P; E(x)]: P is a trainable [k, hidden] matrix prepended to the token
embeddings E(x) of every sequence, and only P trains (the base is frozen). Initialisation:

- `vocab`: k rows of the embedding matrix at uniformly sampled token ids (PEFT's SAMPLE_VOCAB;
  Lester et al. sample the 5,000 most common tokens and find vocabulary init beats random);
- `text`: the embeddings of `init_text`'s tokens, repeated or cut to k (PEFT's TEXT);
- `random`: Gaussian with the embedding matrix's standard deviation (PEFT's RANDOM draws N(0, 1),
  which is far from the scale of real token embeddings; Lester et al. draw U(-0.5, 0.5) for T5).

The virtual tokens are inserted by forward hooks on the backbone (deltas/virtual.py), so any
transformers model and head works. On disk: PEFT's PROMPT_TUNING layout (`prompt_embeddings`).
`Prompt` is also the base of P-tuning (deltas/ptuning.py), whose virtual tokens come out of an
encoder network.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from deltatune.deltas.base import Delta, DeltaConfig
from deltatune.deltas.virtual import PromptHost, backbone_of
from deltatune.errors import UserError

__all__ = ["TokenInitConfig", "PromptConfig", "Prompt", "PromptTable", "init_token_ids", "output_with", "text_config"]

PROMPT_KEY = "prompt_embeddings"
"""PEFT's on-disk key for the virtual tokens of every prompt-learning method."""


class TokenInitConfig(DeltaConfig):
    """Config fields of the methods whose virtual tokens can start from real tokens."""

    init: Literal["vocab", "text", "random"] = "vocab"
    """Start from sampled vocabulary tokens, from `init_text`'s tokens, or at random (see the method)."""
    init_text: str | None = None
    """Text whose tokens the virtual tokens start from (with `init: text`), repeated or cut to k."""
    tokenizer: str | None = None
    """Tokenizer for `init_text` (default: the base model's)."""

    @model_validator(mode="after")
    def _text_needs_text(self) -> TokenInitConfig:
        if self.init == "text" and not self.init_text:
            raise ValueError("init: text needs init_text (the words the virtual tokens start from)")
        return self


class PromptConfig(TokenInitConfig):
    method: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(20, ge=1)
    """Number k of virtual tokens prepended to every sequence."""


class PromptTable(nn.Module):
    """k virtual-token vectors: `embedding.weight` [k, dim] (PEFT's module layout)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.embedding = nn.Embedding(*weight.shape, device=weight.device)
        with torch.no_grad():
            self.embedding.weight.copy_(weight)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


def text_config(model: nn.Module) -> Any:
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


class VirtualTokenDelta(Delta):
    """What prompt, P-tuning, prefix and P-tuning v2 share: one module per adapter in the ModuleDict
    `model.<container>`, applied by a host of forward hooks (`host_class`: virtual tokens in the
    input, or key/value prefixes in every attention layer) that reads `enabled` and `row_mask`."""

    container: ClassVar[str]
    """Attribute of the model holding the adapters' modules (a ModuleDict keyed by adapter name)."""
    host_class: ClassVar[type]

    # ---- the source protocol of the hosts ----------------------------------------------------------
    enabled: bool = True
    row_mask: torch.Tensor | None = None

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def _add_module(self, model: nn.Module, module: nn.Module) -> Any:
        """Store `module` under `model.<container>[name]` and register with the model's host (returned)."""
        modules = getattr(model, self.container, None)
        if modules is None:
            modules = nn.ModuleDict()
            model.add_module(self.container, modules)
        if self.name in modules:
            raise ValueError(f"adapter '{self.name}' of method {self.config.method} already exists on this model")
        modules[self.name] = module
        self.enabled, self.row_mask = True, None
        host = self.host_class.of(model)
        host.add(self)
        return host

    def module(self) -> nn.Module:
        assert self.model is not None, "attach the delta first"
        return getattr(self.model, self.container)[self.name]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for key, param in self.module().named_parameters():
            yield f"{self.container}.{self.name}.{key}", param

    # ---- switching ---------------------------------------------------------------------------------
    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled

    def set_row_mask(self, mask: torch.Tensor | None) -> None:
        self.row_mask = None if mask is None else torch.as_tensor(mask, dtype=torch.bool)

    def remove(self) -> None:
        assert self.model is not None
        self.host_class.of(self.model).remove(self)
        modules = getattr(self.model, self.container)
        del modules[self.name]
        if not len(modules):
            delattr(self.model, self.container)

    # ---- on disk: PEFT's prompt-learning layout ----------------------------------------------------
    def export_state(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """`prompt_embeddings`: what the adapter's module outputs (virtual tokens [k, hidden], or a
        folded prefix [k, layers * 2 * kv_dim]), computed from `state` (full tensors by in-memory
        name, e.g. gathered FSDP shards) if given."""
        return {PROMPT_KEY: output_with(self.module(), f"{self.container}.{self.name}.", state).detach()}


class Prompt(VirtualTokenDelta):
    """Virtual tokens in front of the input (see module docstring). Not mergeable."""

    config_class = PromptConfig
    peft_type = "PROMPT_TUNING"
    container = "prompt_tuning"
    host_class = PromptHost
    config: PromptConfig

    def prompt_embeddings(self) -> torch.Tensor:
        """[k, hidden] virtual-token embeddings."""
        return self.module()()

    # ---- building ----------------------------------------------------------------------------------
    def _attach(self, model: nn.Module) -> None:
        embeddings = backbone_of(model).get_input_embeddings()
        self.hidden = embeddings.weight.shape[1]
        self._add_module(model, self.build(model, embeddings))

    def build(self, model: nn.Module, embeddings: nn.Embedding) -> nn.Module:
        """The module holding this adapter's parameters."""
        return PromptTable(self.initial_prompt(model, embeddings))

    def initial_prompt(self, model: nn.Module, embeddings: nn.Embedding) -> torch.Tensor:
        """[k, hidden] fp32 starting values (see `PromptConfig.init`)."""
        weight = embeddings.weight.detach()
        if self.config.init == "random":
            return torch.randn(self.num_virtual_tokens, weight.shape[1], device=weight.device) * weight.float().std()
        return weight[init_token_ids(model, self.config, self.num_virtual_tokens)].float().clone()

    # ---- on disk: PEFT's prompt-learning layout ----------------------------------------------------
    def import_state(self, stored: dict[str, torch.Tensor], source: str = "adapter") -> None:
        value = stored.get(PROMPT_KEY)
        expected = (self.num_virtual_tokens, self.hidden)
        if value is None or tuple(value.shape) != expected:
            got = "no prompt_embeddings" if value is None else f"prompt_embeddings of shape {tuple(value.shape)}"
            raise UserError(f"{source}: {got}, expected {expected} (was the adapter trained on a different base model?)")
        self.load_table(value)

    def load_table(self, value: torch.Tensor) -> None:
        with torch.no_grad():
            self.module().embedding.weight.copy_(value)

    def prompt_learning_fields(self) -> dict[str, Any]:
        """The `adapter_config.json` fields PEFT's prompt-learning methods share."""
        config = text_config(self.model)
        return {
            "peft_type": self.peft_type,
            "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": self.hidden,
            "num_transformer_submodules": 1,
            "num_attention_heads": config.num_attention_heads,
            "num_layers": config.num_hidden_layers,
            "modules_to_save": None,
        }

    def peft_config(self) -> dict[str, Any]:
        cfg = self.config
        return {
            **self.prompt_learning_fields(),
            "prompt_tuning_init": {"vocab": "SAMPLE_VOCAB", "text": "TEXT", "random": "RANDOM"}[cfg.init],
            "prompt_tuning_init_text": cfg.init_text,
            "tokenizer_name_or_path": cfg.tokenizer or getattr(self.model, "name_or_path", None),
            "tokenizer_kwargs": None,
        }

    @classmethod
    def config_from_peft(cls, peft: dict[str, Any]) -> PromptConfig:
        """Our config for a PROMPT_TUNING `adapter_config.json`. The init is irrelevant (the weights
        are loaded next), so it is `random`: loading never needs the init text's tokenizer."""
        _single_submodule(peft)
        return PromptConfig(num_virtual_tokens=peft["num_virtual_tokens"], init="random")


def output_with(module: nn.Module, prefix: str, state: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """`module()`, with its parameters replaced by `state[prefix + name]` when `state` is given."""
    if state is None:
        return module()
    return torch.func.functional_call(module, {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}, ())


def init_token_ids(model: nn.Module, cfg: Any, k: int) -> torch.Tensor:
    """[k] token ids a prompt starts from: uniformly sampled (`init: vocab`) or `init_text`'s tokens
    repeated or cut to k (`init: text`), tokenized by `cfg.tokenizer` or the model's own."""
    embeddings = backbone_of(model).get_input_embeddings().weight
    if cfg.init == "vocab":
        # A generator seeded from torch's seed (train.seed): the same tokens however much randomness
        # ran before, so a resumed run rebuilds the same starting point (prefix's fixed offset).
        generator = torch.Generator().manual_seed(torch.initial_seed() % 2**63)
        return torch.randint(0, embeddings.shape[0], (k,), generator=generator).to(embeddings.device)
    from deltatune.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer or getattr(model, "name_or_path", None) or "")
    ids = tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError(f"delta.init_text {cfg.init_text!r} gives no tokens")
    return torch.tensor((ids * (k // len(ids) + 1))[:k], device=embeddings.device)


def _single_submodule(peft: dict[str, Any]) -> None:
    if peft.get("num_transformer_submodules", 1) != 1:
        raise UserError("this PEFT adapter is for an encoder-decoder model (2 transformer submodules); deltatune loads decoder and encoder ones")
