"""What a set of deltas trains and where: the numbers behind `deltatune inspect`.

For each delta: its trainable parameters (count and % of the base model), where they sit (grouped
by module path with block numbers replaced by `*`, with the module type and the blocks covered)
and whether it can be merged into the base weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from deltatune.deltas import DeltaSet
from deltatune.deltas.layer import DeltaLayer, innermost

__all__ = ["Placement", "DeltaReport", "describe", "format_report", "base_parameter_count", "inspect_path"]


@dataclass
class Placement:
    """Parameters of one delta in the modules matching one path pattern."""

    pattern: str
    """Module path with block numbers as `*` (`model.layers.*.self_attn.q_proj`)."""
    module_type: str
    modules: int = 0
    params: int = 0
    blocks: set[int] = field(default_factory=set)


@dataclass
class DeltaReport:
    name: str
    method: str
    trainable: int
    base: int
    mergeable: bool
    where: list[Placement]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.base, 1)


def base_parameter_count(model: nn.Module) -> int:
    """Parameters of the model without any delta's own tensors (tied weights counted once)."""
    adapter_ids = set()
    for module in model.modules():
        if isinstance(module, DeltaLayer):
            base_ids = {id(p) for p in module.base_layer.parameters()}
            adapter_ids |= {id(p) for p in module.parameters() if id(p) not in base_ids}
    return sum(p.numel() for p in model.parameters() if id(p) not in adapter_ids)


def _owner(modules: dict[str, nn.Module], name: str) -> tuple[str, nn.Module]:
    """The module a parameter belongs to for reporting: its wrapper's target, or its parent."""
    parts = name.split(".")[:-1]
    for i in range(len(parts), 0, -1):
        path = ".".join(parts[:i])
        if isinstance(modules.get(path), DeltaLayer):
            return re.sub(r"(\.base_layer)+$", "", path), innermost(modules[path])
    path = re.sub(r"\.base_layer(?=\.|$)", "", ".".join(parts))
    return path, innermost(modules.get(".".join(parts), nn.Module()))


def describe(deltas: DeltaSet, base: int | None = None) -> list[DeltaReport]:
    """One report per delta of `deltas` (`base`: the base model's parameter count, if known)."""
    model = deltas.model
    base = base if base is not None else base_parameter_count(model)
    modules = dict(model.named_modules())
    reports = []
    for delta in deltas:
        groups: dict[tuple[str, str], Placement] = {}
        seen_modules: set[str] = set()
        for name, param in delta.named_parameters():
            path, module = _owner(modules, name)
            match = re.search(r"\.(?:layers|layer|h|blocks|block)\.(\d+)(?=\.|$)", f".{path}")
            pattern = re.sub(r"\.(\d+)(?=\.|$)", ".*", path, count=1) if match else path
            key = (pattern, type(module).__name__)
            place = groups.setdefault(key, Placement(pattern, type(module).__name__))
            place.params += param.numel()
            if path not in seen_modules:
                seen_modules.add(path)
                place.modules += 1
            if match:
                place.blocks.add(int(match.group(1)))
        reports.append(
            DeltaReport(delta.name, delta.config.method, delta.num_parameters(), base, bool(delta.mergeable), list(groups.values()))
        )
    return reports


def _blocks(blocks: set[int]) -> str:
    if not blocks:
        return "-"
    ordered = sorted(blocks)
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}-{ordered[-1]}" if len(ordered) > 1 else str(ordered[0])
    return ",".join(map(str, ordered))


def format_report(reports: list[DeltaReport]) -> str:
    """A plain-text table per delta."""
    lines = []
    for rep in reports:
        merge = "mergeable" if rep.mergeable else "not mergeable"
        lines.append(
            f"delta {rep.method} ({rep.name!r}): {rep.trainable:,} trainable parameters "
            f"({rep.percent:.4f}% of {rep.base:,}), {merge}"
        )
        width = max([len(p.pattern) for p in rep.where] + [5])
        lines.append(f"  {'where':{width}s}  {'module':14s} {'modules':>7s} {'blocks':>8s} {'params':>14s}")
        for p in sorted(rep.where, key=lambda p: (-p.params, p.pattern)):
            lines.append(f"  {p.pattern:{width}s}  {p.module_type:14s} {p.modules:>7,d} {_blocks(p.blocks):>8s} {p.params:>14,d}")
    return "\n".join(lines)


def inspect_path(path: str | Path, overrides: list[str] | None = None, task: str = "causal-lm") -> str:
    """The report for a YAML config, a run directory (its config.yaml) or an adapter directory:
    loads the base model, attaches the deltas and describes them."""
    from deltatune.config import load_config
    from deltatune.deltas import attach
    from deltatune.errors import UserError
    from deltatune.export.peft_format import load_deltas, read_adapter_config
    from deltatune.models import load_model

    path = Path(path)
    if path.is_file() or (path / "config.yaml").is_file():
        cfg = load_config(path if path.is_file() else path / "config.yaml", overrides or [])
        model, _ = load_model(cfg.model, task=task)
        base = base_parameter_count(model)
        deltas = attach(model, cfg.delta)
        source = f"model {cfg.model}"
    else:
        adapter = path if (path / "adapter_config.json").is_file() else path / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise UserError(f"{path} is not a config file, a run directory (config.yaml) or an adapter directory")
        model_name = read_adapter_config(adapter).get("base_model_name_or_path")
        if not model_name:
            raise UserError(f"{adapter}/adapter_config.json names no base model")
        model, _ = load_model(model_name, task=task)
        base = base_parameter_count(model)
        deltas = load_deltas(model, adapter)
        source = f"model {model_name}, adapter {adapter}"
    return f"{source}: {base:,} parameters\n" + format_report(describe(deltas, base))
