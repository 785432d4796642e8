"""Deltas: every fine-tuning method as trainable parameters laid over a frozen base.

    model, tokenizer = deltatune.load_model("smollm2-135m-instruct")
    deltas = deltatune.attach(model, LoraConfig(r=8))     # base frozen, LoRA trainable
    with deltas.disabled():                                 # the base model, no copy
        ...
    deltas.merge()                                          # fold into the weights
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from deltatune.deltas.base import Delta, DeltaConfig
from deltatune.deltas.inject import freeze
from deltatune.deltas.lora import Lora, LoraConfig
from deltatune.deltas.registry import METHODS, delta_class

__all__ = ["Delta", "DeltaConfig", "DeltaSet", "Lora", "LoraConfig", "METHODS", "attach"]


class DeltaSet:
    """The deltas attached to one model, handled together (train, save, disable, merge)."""

    def __init__(self, model: nn.Module, deltas: Sequence[Delta]) -> None:
        self.model = model
        self.deltas = list(deltas)
        self._disabled = False

    def __iter__(self) -> Iterator[Delta]:
        return iter(self.deltas)

    def __len__(self) -> int:
        return len(self.deltas)

    def __getitem__(self, index: int) -> Delta:
        return self.deltas[index]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every trainable parameter of every delta (each once)."""
        seen: set[int] = set()
        for delta in self.deltas:
            for name, param in delta.named_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield name, param

    def num_trainable(self) -> int:
        return sum(p.numel() for _, p in self.named_parameters())

    def num_total(self) -> int:
        """Parameters of the model including the deltas' (tied weights counted once)."""
        return sum(p.numel() for p in self.model.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: param.detach() for name, param in self.named_parameters()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for delta in self.deltas:
            delta.load_state_dict({k: state[k] for k, _ in delta.named_parameters() if k in state})

    # ---- training hooks (see Delta) -------------------------------------------------------------
    def on_step(self, step: int) -> None:
        for delta in self.deltas:
            delta.on_step(step)

    def regularizer(self) -> torch.Tensor | None:
        """The sum of the deltas' loss terms (None when no delta has one)."""
        terms = [term for delta in self.deltas if (term := delta.regularizer()) is not None]
        return torch.stack([t.reshape(()) for t in terms]).sum() if terms else None

    def on_train_end(self) -> None:
        for delta in self.deltas:
            delta.on_train_end()

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Within the block the model computes as the base model. Nesting is allowed: an inner
        block leaves the deltas disabled for the rest of the outer one."""
        if self._disabled:
            yield
            return
        self._disabled = True
        try:
            with ExitStack() as stack:
                for delta in self.deltas:
                    stack.enter_context(delta.disabled())
                yield
        finally:
            self._disabled = False

    def merge(self) -> None:
        for delta in self.deltas:
            delta.merge()

    def unmerge(self) -> None:
        for delta in reversed(self.deltas):
            delta.unmerge()

    def __repr__(self) -> str:
        return f"DeltaSet({self.deltas!r})"


def attach(model: nn.Module, configs: DeltaConfig | Sequence[DeltaConfig], name: str = "default") -> DeltaSet:
    """Freeze `model` and attach each delta config to it (in order) under adapter `name`.

    Several deltas of the same method get the names `name`, `name_1`, ...
    """
    configs = [configs] if isinstance(configs, DeltaConfig) else list(configs)
    freeze(model)
    deltas, used = [], set()
    for config in configs:
        delta_name = name
        while (config.method, delta_name) in used:
            delta_name = f"{name}_{len(used)}"
        used.add((config.method, delta_name))
        deltas.append(delta_class(config.method)(config, delta_name).attach(model))
    return DeltaSet(model, deltas)
