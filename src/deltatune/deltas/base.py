"""The delta contract: a small set of trainable parameters laid over a frozen base model.

Every fine-tuning method is a `Delta`. A delta has a typed config (`DeltaConfig` subclass, one per
method) and, once attached to a model under an adapter name, it can:

- list its trainable parameters (`named_parameters`), with full module paths in the model;
- save and load only its own state (`state_dict` / `load_state_dict`, in-memory names);
- be disabled (`with delta.disabled(): ...` gives the base model's outputs, which is how DPO and
  PPO get a reference model without a second copy);
- merge into the base weights and unmerge, where the maths allows (`mergeable`); merging twice
  is a no-op;
- take part in training through three hooks the loop calls (defaults do nothing): `on_step`
  before each optimizer step (gradual unfreezing), `regularizer` added to the loss once per step
  (diff pruning's L0 penalty) and `on_train_end` (diff pruning's projection to its budget);
- choose what goes on disk (`export_state` / `import_state`, PEFT's key names by default);
- apply to some rows of a batch only (`set_row_mask`, for mixed-adapter batches) and be
  removed from the model (`remove`), where the method supports it.

Methods that wrap modules build on `DeltaLayer` (deltas/layer.py); the on-disk format (PEFT's
`adapter_config.json` + `adapter_model.safetensors`) is in deltatune.export.peft_format.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from deltatune.errors import UserError

__all__ = ["DeltaConfig", "Delta"]


class DeltaConfig(BaseModel):
    """Base of every method's config; `method` selects the method in the registry."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    method: str
    """Which method (see `deltatune methods`)."""


class Delta(abc.ABC):
    """One method's parameters, attached to a model under an adapter `name`."""

    config_class: ClassVar[type[DeltaConfig]]
    """The typed config of this method."""
    mergeable: ClassVar[bool] = False
    """Whether `merge()` can fold the delta into the base weights exactly."""
    peft_type: ClassVar[str | None] = None
    """PEFT's name for the method when PEFT also has it (on-disk `peft_type`)."""
    saves_model: ClassVar[bool] = False
    """Whether a run with this delta also writes a full model directory (`full` does)."""

    def __init__(self, config: DeltaConfig, name: str = "default") -> None:
        self.config = config
        self.name = name
        self.model: nn.Module | None = None
        self.merged = False

    # ---- attaching -------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> Delta:
        """Add this delta to `model` in place (the base should already be frozen) and return self."""
        self.model = model
        self._attach(model)
        for _, param in self.named_parameters():
            param.requires_grad_(True)
        return self

    @abc.abstractmethod
    def _attach(self, model: nn.Module) -> None:
        """Inject modules or mark parameters; called once by `attach`."""

    @abc.abstractmethod
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This delta's trainable parameters, named by their full path in the model."""

    # ---- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """This delta's parameters (detached), keyed by their full in-memory names."""
        return {name: param.detach() for name, param in self.named_parameters()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy `state` (as returned by `state_dict`) into this delta's parameters; keys must match."""
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise KeyError(f"delta '{self.name}' state mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for key, param in params.items():
                value = state[key]
                if value.shape != param.shape:
                    raise ValueError(f"delta '{self.name}': {key} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
                param.copy_(value)

    def num_parameters(self) -> int:
        return sum(p.numel() for _, p in self.named_parameters())

    # ---- training hooks (called by deltatune.train.loop) ----------------------------------------
    def on_step(self, step: int) -> None:
        """Called before optimizer step `step` (1-based) runs, including the first step after a
        resume. A delta whose trainable set changes over training (gradual unfreezing) sets it here
        as a pure function of `step`, so a resumed run continues exactly. The optimizer holds every
        parameter of `named_parameters()` from the start; ones without a gradient are skipped."""
        return None

    def regularizer(self) -> torch.Tensor | None:
        """A scalar added to the training loss once per optimizer step (e.g. diff pruning's expected
        L0 norm times its weight), or None. It must be differentiable w.r.t. this delta's parameters."""
        return None

    def on_train_end(self) -> None:
        """Called once when training finishes, after the last checkpoint and before the final
        evaluation (e.g. diff pruning projects its difference vector to the exact budget here)."""
        return None

    # ---- switching -------------------------------------------------------------------------
    @abc.abstractmethod
    def set_enabled(self, enabled: bool) -> None:
        """Turn the delta's effect on or off without touching its parameters."""

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Within the block the model computes as the base model (a merged delta is unmerged)."""
        was_merged = self.merged
        if was_merged:
            self.unmerge()
        self.set_enabled(False)
        try:
            yield
        finally:
            self.set_enabled(True)
            if was_merged:
                self.merge()

    def merge(self) -> None:
        """Fold the delta into the base weights (a no-op when already merged)."""
        if not self.mergeable:
            raise TypeError(f"method '{self.config.method}' cannot be merged into the base weights")
        if not self.merged:
            if self.model is not None:
                # Never merge into 4/8-bit codes: the sum would be rounded back to 16 levels and the
                # update mostly lost (QLoRA). Quantized base layers become full precision first.
                from deltatune.models.quantize import dequantize_model

                dequantize_model(self.model)
            self._merge(sign=1.0)
            self.merged = True

    def unmerge(self) -> None:
        """Undo `merge` (a no-op when not merged)."""
        if self.merged:
            self._merge(sign=-1.0)
            self.merged = False

    def _merge(self, sign: float) -> None:
        raise TypeError(f"method '{self.config.method}' cannot be merged")

    # ---- mixed batches and removal -----------------------------------------------------------
    def set_row_mask(self, mask: torch.Tensor | None) -> None:
        """Apply this delta only to the batch rows where `mask` ([batch] bool) is true; None applies
        it to every row again. Used for mixed-adapter batches (deltatune.deltas.adapters)."""
        raise TypeError(f"method '{self.config.method}' does not support mixed-adapter batches")

    def remove(self) -> None:
        """Take this delta out of the model (its parameters are dropped, wrapped modules unwrapped
        where no other adapter uses them). The model then computes as before `attach`."""
        raise TypeError(f"method '{self.config.method}' cannot be removed from a model")

    # ---- on-disk format ------------------------------------------------------------------------
    def export_state(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The tensors written to `adapter_model.safetensors`, keyed by their on-disk names
        (PEFT's names by default; see `peft_key`). `state` (in-memory names, e.g. full tensors
        gathered from FSDP shards) replaces the parameters' own values."""
        state = self.state_dict() if state is None else state
        return {self.peft_key(name): t for name, t in state.items()}

    def import_state(self, stored: dict[str, torch.Tensor], source: str = "adapter") -> None:
        """Load tensors written by `export_state` (or by PEFT); `source` names the file in errors."""
        by_key = {self.peft_key(n): n for n, _ in self.named_parameters()}
        missing = sorted(set(by_key) - set(stored))
        if missing:
            raise UserError(
                f"{source}: {len(missing)} tensors this model needs are missing (e.g. {missing[0]}); "
                "was the adapter trained on a different base model?"
            )
        try:
            self.load_state_dict({by_key[k]: v for k, v in stored.items() if k in by_key})
        except ValueError as exc:
            raise UserError(f"{source}: {exc} (was the adapter trained on a different base model?)") from None

    def peft_config(self) -> dict[str, Any]:
        """The `adapter_config.json` fields for this delta (PEFT's names where PEFT has the method)."""
        return {"peft_type": self.peft_type or self.config.method.upper(), **self.config.model_dump(mode="json")}

    def peft_key(self, name: str) -> str:
        """On-disk key for an in-memory parameter name (PEFT's convention: the adapter name is
        dropped and `base_model.model.` is prepended)."""
        return "base_model.model." + name.replace(f".{self.name}.", ".").removesuffix(f".{self.name}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, params={self.num_parameters():,}, {self.config!r})"
