"""Export a tuned backbone as a plain Hugging Face model directory (deltas merged into the weights).

Used by `stage: mlm` to hand the domain-adapted encoder to a later run (`model: RUN/model`): the
MLM head is dropped and the backbone is written with every tensor of the base checkpoint that the
MLM model does not have (BERT's pooler, for example) taken unchanged from the base.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from deltatune.deltas import DeltaSet
from deltatune.deltas.inject import set_module
from deltatune.deltas.layer import DeltaLayer
from deltatune.errors import UserError
from deltatune.export.peft_format import _write_atomic_dir
from deltatune.models import load_model

__all__ = ["unwrapped", "plain_state_dict", "save_merged_backbone"]


@contextmanager
def unwrapped(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every delta wrapper is replaced by the module it wraps (merged weights stay)."""
    wrappers = [(path, module) for path, module in model.named_modules() if isinstance(module, DeltaLayer)]
    wrappers = [(p, m) for p, m in wrappers if not any(p.startswith(f"{q}.") for q, _ in wrappers)]
    for path, module in wrappers:
        set_module(model, path, module.base_layer)
    try:
        yield model
    finally:
        for path, module in wrappers:
            set_module(model, path, module)


def plain_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of `module` with its deltas' wrappers removed (call after merging)."""
    with unwrapped(module):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def save_merged_backbone(
    model: nn.Module, deltas: DeltaSet, base_spec: str, tokenizer: PreTrainedTokenizerBase, directory: str | Path
) -> Path:
    """Write `model.base_model` with `deltas` merged to `directory` (safetensors + tokenizer),
    completed by the base checkpoint's own backbone tensors that the model lacks."""
    unmergeable = [d.config.method for d in deltas if not d.mergeable]
    if unmergeable:
        raise UserError(
            f"cannot export a merged model: method(s) {', '.join(unmergeable)} cannot be merged into the weights; "
            "set mlm.export_model: false, or use a mergeable method (lora, head, ...)"
        )
    # merge -> unmerge is not bit-exact in floating point, and the tuned weights (a head inside a
    # LoRA-wrapped layer, for one) must stay exactly as trained: restore them from a copy
    before = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    deltas.merge()
    try:
        tuned = plain_state_dict(model.base_model)
    finally:
        deltas.unmerge()
        with torch.no_grad():
            for key, value in model.state_dict(keep_vars=True).items():
                value.copy_(before[key])
    backbone, _ = load_model(base_spec, task="base")
    missing, unexpected = backbone.load_state_dict(tuned, strict=False)
    if unexpected:
        raise UserError(f"cannot export: the tuned backbone has tensors the base model lacks (e.g. {unexpected[0]})")
    directory = Path(directory)

    def fill(tmp: Path) -> None:
        backbone.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    _write_atomic_dir(directory, fill)
    return directory
