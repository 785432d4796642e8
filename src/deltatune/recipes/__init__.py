"""Recipes: one readable loop per stage family. `STAGES` maps `stage:` to its entry point."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deltatune.config import RunConfig

__all__ = ["STAGES", "run_stage"]


def _sft(cfg: RunConfig, log: Callable[[str], None]) -> dict[str, Any]:
    from deltatune.recipes import sft

    return sft.run(cfg, log)


def _recipe(module: str) -> Callable[[RunConfig, Callable[[str], None]], dict[str, Any]]:
    """The `run` of recipes/<module>.py, imported when the stage runs."""

    def run(cfg: RunConfig, log: Callable[[str], None]) -> dict[str, Any]:
        from importlib import import_module

        return import_module(f"deltatune.recipes.{module}").run(cfg, log)

    return run


STAGES: dict[str, Callable[[RunConfig, Callable[[str], None]], dict[str, Any]]] = {
    "sft": _sft,
    "reward": _recipe("reward"),
    "dpo": _recipe("dpo"),
    "ppo": _recipe("ppo"),
    "grpo": _recipe("grpo"),
}


def run_stage(cfg: RunConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the recipe of `cfg.stage` and return the run's summary."""
    return STAGES[cfg.stage](cfg, log)
