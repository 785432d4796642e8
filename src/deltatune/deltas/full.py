"""Full fine-tuning: every parameter of the model trains (the delta that covers everything).

The run saves a complete model directory (`OUTPUT_DIR/model/`: safetensors weights, config and
tokenizer, loadable by `transformers.AutoModel*.from_pretrained`) besides the adapter directory
(deltatune.export.outputs). Tied weights (an LM head tied to the input embeddings) train once.

Disabling it (`with deltas.disabled():`, the reference model of DPO/PPO and the demo's
before/after scoring) swaps in a copy of the original weights, which the delta keeps from
`attach` on: that is one more copy of the model's weights in memory. Set `keep_base: false` to
save that memory when nothing needs the base model; `disabled()` then raises.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from torch import nn

from deltatune.deltas.base import DeltaConfig
from deltatune.deltas.select import SelectDelta

__all__ = ["FullConfig", "Full"]


class FullConfig(DeltaConfig):
    method: Literal["full"] = "full"
    keep_base: bool = True
    """Keep a copy of the original weights so `disabled()` gives the base model (costs one more
    copy of the weights in memory); false saves it when no reference model is needed."""


class Full(SelectDelta):
    """Full fine-tuning: every parameter trains; the run also writes a transformers model directory (OUTPUT_DIR/model/)."""

    config_class = FullConfig
    config: FullConfig
    saves_model: ClassVar[bool] = True

    def select(self, model: nn.Module) -> list[str]:
        # remove_duplicate: a tied LM head is the embedding matrix, listed (and trained) once.
        return [name for name, _ in model.named_parameters()]
