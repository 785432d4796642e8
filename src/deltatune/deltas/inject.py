"""Find the modules a delta targets and swap wrappers in for them (PEFT's inject-and-replace).

Targets are given as:
- `"all-linear"`: every `nn.Linear` except the output layer (LM head) and task heads;
- a list of names: a module matches when its path equals a name or ends with `.name`
  (`q_proj` matches `model.layers.0.self_attn.q_proj`);
- any other string: a regular expression that must match the whole module path.
`layers` optionally restricts the match to some transformer blocks by index.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from deltatune.errors import ConfigError

__all__ = ["find_targets", "get_module", "set_module", "freeze", "layer_index", "HEAD_NAMES"]

HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs", "v_head")
"""Module names treated as task heads: never wrapped by `all-linear`."""

_LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")


def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at `path` with `module`."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def layer_index(path: str) -> int | None:
    """Index of the transformer block a module path sits in (`model.layers.3.mlp` -> 3), if any."""
    match = _LAYER_INDEX.search(f".{path}.")
    return int(match.group(1)) if match else None


def _is_head(model: nn.Module, path: str, module: nn.Module) -> bool:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and module is output:
        return True
    return any(part in HEAD_NAMES for part in path.split("."))


def find_targets(
    model: nn.Module,
    target: str | Sequence[str],
    module_types: tuple[type[nn.Module], ...] = (nn.Linear,),
    layers: Sequence[int] | None = None,
) -> list[str]:
    """Paths of the modules of `module_types` in `model` that `target` selects (see module doc)."""
    from deltatune.deltas.layer import DeltaLayer, innermost

    found, wrappers = [], []
    for path, module in model.named_modules():
        if any(path.startswith(f"{w}.") for w in wrappers):
            continue  # inside a wrapper: its base layer is matched through the wrapper's path
        if isinstance(module, DeltaLayer):
            wrappers.append(path)
            module = innermost(module)
        if not path or not isinstance(module, module_types):
            continue
        if target == "all-linear":
            hit = not _is_head(model, path, module)
        elif isinstance(target, str):
            hit = re.fullmatch(target, path) is not None
        else:
            hit = any(path == t or path.endswith(f".{t}") for t in target)
        if hit and layers is not None:
            hit = layer_index(path) in set(layers)
        if hit:
            found.append(path)
    if not found:
        kinds = f"{module_types[0].__name__} module" + (
            f" (nor {', '.join(t.__name__ for t in module_types[1:])})" if len(module_types) > 1 else ""
        )
        examples = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, module_types)})
        raise ConfigError(
            f"delta.target {target!r} matches no {kinds} in this model; "
            f"names here include: {', '.join(examples[:12]) or '(none)'}"
        )
    return found


def freeze(model: nn.Module) -> None:
    """Make every parameter of `model` non-trainable (deltas then mark their own)."""
    for param in model.parameters():
        param.requires_grad_(False)
