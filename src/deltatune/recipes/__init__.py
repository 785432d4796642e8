"""Recipes: one readable loop per stage family.

`STAGES` maps `stage:` to its training entry point, `EVAL_SETUPS` to the function that loads a
finished run for `deltatune eval` (model, deltas, eval batches); the stage's metric function is in
`deltatune.eval.metrics.METRICS`. A new stage adds one line to each.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltatune.config import RunConfig
from deltatune.errors import UserError
from deltatune.recipes import classify, dpo, grpo, mlm, ppo, pt, reward, sft, tokens
from deltatune.recipes.common import EvalSetup

__all__ = ["STAGES", "EVAL_SETUPS", "run_stage"]


STAGES: dict[str, Callable[[RunConfig, Callable[[str], None]], dict[str, Any]]] = {
    "sft": sft.run,
    "pt": pt.run,
    "mlm": mlm.run,
    "classify": classify.run,
    "tokens": tokens.run,
    "reward": reward.run,
    "dpo": dpo.run,
    "ppo": ppo.run,
    "grpo": grpo.run,
}

SINGLE_PROCESS = ("ppo", "grpo")
"""Stages with their own rollout loop, not yet written for several processes."""

EVAL_SETUPS: dict[str, Callable[[RunConfig, Path], EvalSetup]] = {
    "sft": sft.eval_setup,
    "pt": pt.eval_setup,
    "mlm": mlm.eval_setup,
    "classify": classify.eval_setup,
    "tokens": tokens.eval_setup,
}


def run_stage(cfg: RunConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the recipe of `cfg.stage` and return the run's summary.

    Under torchrun this joins the process group for the run, lets rank 0 alone fill the model
    cache first (e.g. a GGUF converted once), and only rank 0 prints.
    """
    from deltatune.models.load import resolve_model_source
    from deltatune.train import dist
    from deltatune.train.allocator import release_freed_memory

    release_freed_memory()  # before loading: RSS follows live tensors from the start (train/allocator.py)
    with dist.session(cfg.train.device, cfg.train.dist_timeout):
        if dist.is_distributed():
            if cfg.stage in SINGLE_PROCESS:
                raise UserError(
                    f"stage {cfg.stage} runs on one process (its rollout loop does not share work between "
                    "processes yet): run it without --nproc / torchrun"
                )
            dist.main_first(lambda: resolve_model_source(cfg.model))
            log = log if dist.is_main() else _quiet
        return STAGES[cfg.stage](cfg, log)


def _quiet(message: str) -> None:
    """The log of ranks other than 0."""
