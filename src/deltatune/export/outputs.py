"""What a training run leaves behind: the adapter directory, and a full model when a delta asks.

Every run writes `OUTPUT_DIR/adapter/` (deltatune.export.peft_format), which `deltatune generate`,
the demo's before/after scoring and `load_deltas` read. A run whose deltas include one that
`saves_model` (`full`) also writes `OUTPUT_DIR/model/`: the fine-tuned model with every mergeable
delta merged in, as a plain transformers directory (config, `model.safetensors`, tokenizer) that
`AutoModelForCausalLM.from_pretrained` (or the matching AutoModel class) loads without deltatune.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from deltatune.deltas import DeltaSet
from deltatune.deltas.layer import DeltaLayer
from deltatune.export.peft_format import _write_atomic_dir, save_deltas

__all__ = ["save_outputs", "save_model_dir", "plain_state_dict"]


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state under its original names: wrappers' adapter tensors dropped and
    `.base_layer` segments removed (call after merging, so the base weights hold the deltas)."""
    adapter_prefixes = []
    for path, module in model.named_modules():
        if isinstance(module, DeltaLayer):
            adapter_prefixes.append(f"{path}.")
    state = {}
    for key, value in model.state_dict().items():
        owner = max((p for p in adapter_prefixes if key.startswith(p)), key=len, default=None)
        if owner is not None and not key.startswith(f"{owner}base_layer."):
            continue  # an adapter's own tensor
        state[re.sub(r"\.base_layer(?=\.)", "", key)] = value
    return state


def save_model_dir(deltas: DeltaSet, directory: str | Path, tokenizer=None) -> Path | None:
    """Write the model with every mergeable delta merged in as a transformers directory.

    Returns None (and writes nothing) when merging would give tensors the model's architecture
    has no place for (e.g. biases BitFit added to a Llama), since transformers would drop them.
    """
    model = deltas.model
    merged_here = [d for d in deltas if d.mergeable and not d.merged]
    for delta in merged_here:
        delta.merge()
    try:
        state = plain_state_dict(model)
        with torch.device("meta"):
            expected = set(type(model)(model.config).state_dict())
        if set(state) - expected:
            return None
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}

        def fill(tmp: Path) -> None:
            model.save_pretrained(tmp, state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)

        directory = Path(directory)
        _write_atomic_dir(directory, fill)
        return directory
    finally:
        for delta in reversed(merged_here):
            delta.unmerge()


def save_outputs(
    deltas: DeltaSet,
    run_dir: str | Path,
    base_model: str,
    tokenizer=None,
    log: Callable[[str], None] = print,
    weights: dict[str, torch.Tensor] | None = None,
) -> dict[str, Path]:
    """Write `run_dir/adapter/` and, when a delta `saves_model`, `run_dir/model/`; returns the paths.

    `weights` (full tensors by in-memory name, e.g. gathered from FSDP shards) replaces the
    deltas' own values in the adapter."""
    from deltatune.train.parallel import is_sharded

    run_dir = Path(run_dir)
    written = {"adapter": save_deltas(deltas, run_dir / "adapter", base_model=base_model, weights=weights)}
    if any(d.saves_model for d in deltas):
        if is_sharded(deltas.model):
            log("not writing model/ from FSDP shards; the adapter holds every weight (merge it on one process)")
            return written
        model_dir = save_model_dir(deltas, run_dir / "model", tokenizer)
        if model_dir is None:
            log("not writing model/: a merged delta adds tensors this architecture cannot hold; use adapter/")
        else:
            written["model"] = model_dir
    return written
