"""Deltas that train a subset of the model's own parameters (the "select" family), and `head`.

A `SelectDelta` marks existing parameters trainable and changes them in place, so it is always
"merged". To disable it (a reference model for DPO/PPO, before/after evaluation) it keeps a copy
of the selected parameters' original values and swaps them in for the duration; the copy costs
as much memory as the selection (small for a head or biases, a whole model for `full`).
`Selection` holds that bookkeeping so deltas that also add parameters (BitFit) can reuse it.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from deltatune.deltas.base import Delta, DeltaConfig
from deltatune.deltas.inject import HEAD_NAMES
from deltatune.errors import ConfigError

__all__ = ["Selection", "SelectDelta", "HeadConfig", "Head", "find_head_modules"]


class Selection:
    """Named existing parameters of a model, with their original values (when kept) so they can be
    swapped back in (`set_original(True)`) and restored on removal."""

    def __init__(self, model: nn.Module, names: list[str], keep_original: bool = True) -> None:
        params = dict(model.named_parameters(remove_duplicate=False))
        self.params = {name: params[name] for name in names}
        self.original = {n: p.detach().clone() for n, p in self.params.items()} if keep_original else None
        self._stash: dict[str, torch.Tensor] | None = None

    def set_original(self, original: bool, method: str) -> None:
        """Swap the original values in (True) or the trained ones back (False)."""
        if self.original is None:
            if original:
                raise TypeError(f"delta {method}: no copy of the original weights was kept (keep_base: false), so it cannot be disabled")
            return
        with torch.no_grad():
            if original and self._stash is None:
                self._stash = {n: p.detach().clone() for n, p in self.params.items()}
                for name, param in self.params.items():
                    param.copy_(self.original[name])
            elif not original and self._stash is not None:
                for name, param in self.params.items():
                    param.copy_(self._stash[name])
                self._stash = None

    def restore(self) -> None:
        """Put the original values back for good and freeze the parameters."""
        if self.original is not None:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(self.original[name])
        for param in self.params.values():
            param.requires_grad_(False)


class SelectDelta(Delta):
    """Base for methods that train selected existing parameters in place."""

    mergeable = True  # the change already lives in the weights

    @abc.abstractmethod
    def select(self, model: nn.Module) -> list[str]:
        """Full names of the parameters this delta trains."""

    def _attach(self, model: nn.Module) -> None:
        self.names = self.select(model)
        self.selection = Selection(model, self.names, keep_original=getattr(self.config, "keep_base", True))
        self.merged = True

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from self.selection.params.items()

    def set_enabled(self, enabled: bool) -> None:
        self.selection.set_original(not enabled, self.config.method)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Within the block the selected parameters hold their original values."""
        self.set_enabled(False)
        try:
            yield
        finally:
            self.set_enabled(True)

    def merge(self) -> None:
        """Already in the weights: nothing to do."""

    def unmerge(self) -> None:
        """The selected parameters are the weights themselves; use `disabled()` to see the base."""

    def remove(self) -> None:
        """Restore the original values (needs the kept copy) and freeze the parameters again."""
        if self.selection.original is None:
            raise TypeError(f"delta {self.config.method}: no copy of the original weights was kept (keep_base: false)")
        self.selection.restore()
        self.model = None

    def peft_key(self, name: str) -> str:
        return "base_model.model." + name


class HeadConfig(DeltaConfig):
    method: Literal["head"] = "head"
    modules: list[str] | None = None
    """Module names of the head(s) to train; default: the model's task head (classifier, score, ...)."""


def find_head_modules(model: nn.Module) -> list[str]:
    """Paths of the task-head modules of a model (`classifier`, `score`, `v_head`, ...), never the
    LM head of a causal LM (tied to the input embeddings in many models)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for path, module in model.named_modules():
        if path.split(".")[-1] in HEAD_NAMES and module is not output and path.split(".")[-1] != "lm_head":
            if not any(path.startswith(f"{f}.") for f in found):
                found.append(path)
    return found


def params_under(model: nn.Module, modules: list[str]) -> list[str]:
    """Names of the parameters inside the modules `modules` (paths or trailing names)."""
    return [
        path
        for path, _ in model.named_parameters(remove_duplicate=False)
        if any(path == m or path.startswith(f"{m}.") or f".{m}." in f".{path}" for m in modules)
    ]


class Head(SelectDelta):
    """Train only a (new) task head on a frozen body: linear probing, or alongside other deltas."""

    config_class = HeadConfig
    config: HeadConfig

    def select(self, model: nn.Module) -> list[str]:
        modules = self.config.modules or find_head_modules(model)
        if not modules:
            raise ConfigError("delta head: this model has no task head (classifier/score); name one in delta.modules")
        names = params_under(model, modules)
        if not names:
            raise ConfigError(f"delta head: no parameters under modules {modules}")
        return names
