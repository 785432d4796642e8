"""`deltatune eval CONFIG|RUN`: the stage's metrics on the eval split, base vs tuned, side by side.

The base model is the run's model with its deltas disabled (no second copy in memory); for a
classifier that means the new head at its initial values, which is why the classification report
also carries the majority-class baseline. Results go into the run's summary.json under `eval`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltatune.config import RunConfig, load_config
from deltatune.errors import UserError
from deltatune.eval.metrics import METRICS
from deltatune.train.loop import autocast_for
from deltatune.train.summary import update_summary

__all__ = ["resolve_run", "evaluate_run", "format_report"]


def resolve_run(target: str | Path, overrides: list[str] | None = None) -> tuple[RunConfig, Path]:
    """(config, run directory) of a run directory (its config.yaml) or of a config file (its output_dir)."""
    path = Path(target)
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise UserError(f"{path} is not a run directory: config.yaml is missing")
        return load_config(path / "config.yaml", overrides), path
    cfg = load_config(path, overrides)
    return cfg, Path(cfg.output_dir)


def evaluate_run(target: str | Path, overrides: list[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Score base and tuned model of a finished run on its eval split; write and return the report."""
    from deltatune.recipes import EVAL_SETUPS
    from deltatune.recipes.common import trained_run_dir

    cfg, run_dir = resolve_run(target, overrides)
    cfg.output_dir = str(run_dir)
    trained_run_dir(cfg)
    setup = EVAL_SETUPS[cfg.stage](cfg, run_dir)
    if next(iter(setup.batches()), None) is None:
        raise UserError(f"{run_dir}: the run has no eval split; set data.eval or data.eval_split (e.g. as an override)")
    metric = METRICS[cfg.stage]
    device = next(setup.model.parameters()).device
    context = {**setup.context, "autocast": lambda: autocast_for(cfg.train, device)}
    with setup.deltas.disabled():
        base = metric(setup.model, setup.batches(), **context)
    tuned = metric(setup.model, setup.batches(), **context)
    report = {"stage": cfg.stage, "split": cfg.data.eval or f"eval_split={cfg.data.eval_split}", "base": base, "tuned": tuned}
    if setup.reference:
        report["reference"] = setup.reference
    update_summary(run_dir, {"eval": report})
    log(format_report(report))
    log(f"written to {run_dir / 'summary.json'} (key 'eval')")
    return report


def format_report(report: dict[str, Any]) -> str:
    """A table of the numeric metrics: base, tuned, and the change."""
    lines = [f"{'metric':24s} {'base':>12s} {'tuned':>12s} {'change':>12s}"]
    for key, tuned in report["tuned"].items():
        base = report["base"].get(key)
        if isinstance(tuned, int | float) and isinstance(base, int | float):
            lines.append(f"{key:24s} {base:12.4f} {tuned:12.4f} {tuned - base:+12.4f}")
    for name, values in report.get("reference", {}).items():
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
        lines.append(f"{name}: {shown}")
    return "\n".join(lines)
