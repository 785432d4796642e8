"""Recipes: one readable loop per stage family. `STAGES` maps `stage:` to its entry point."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deltatune.config import RunConfig

__all__ = ["STAGES", "run_stage"]


def _sft(cfg: RunConfig, log: Callable[[str], None]) -> dict[str, Any]:
    from deltatune.recipes import sft

    return sft.run(cfg, log)


STAGES: dict[str, Callable[[RunConfig, Callable[[str], None]], dict[str, Any]]] = {
    "sft": _sft,
}


def run_stage(cfg: RunConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the recipe of `cfg.stage` and return the run's summary.

    Under torchrun this joins the process group for the run, lets rank 0 alone fill the model
    cache first (e.g. a GGUF converted once), and only rank 0 prints.
    """
    from deltatune.models.load import resolve_model_source
    from deltatune.train import dist

    with dist.session(cfg.train.device, cfg.train.dist_timeout):
        if dist.is_distributed():
            dist.main_first(lambda: resolve_model_source(cfg.model))
            log = log if dist.is_main() else _quiet
        return STAGES[cfg.stage](cfg, log)


def _quiet(message: str) -> None:
    """The log of ranks other than 0."""
