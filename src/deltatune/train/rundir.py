"""The run directory: refuse to clobber another run, record the resolved config, prepare resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from deltatune.config import RunConfig, config_to_yaml
from deltatune.errors import TrainingError
from deltatune.train import dist
from deltatune.train.checkpoint import latest_checkpoint

__all__ = ["prepare_run_dir"]

_MUST_MATCH_ON_RESUME = ("model", "stage", "delta", "data")


def _check_resumable(run_dir: Path, cfg: RunConfig) -> None:
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    current = cfg.model_dump(mode="json")
    changed = [key for key in _MUST_MATCH_ON_RESUME if saved.get(key) != current.get(key)]
    if changed:
        raise TrainingError(
            f"resume: the run in {run_dir} was trained with different {', '.join(changed)} settings; "
            "resume it with its own config.yaml, or use another output_dir"
        )


def _truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be redone)."""
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        path.write_text("".join(f"{line}\n" for line in lines if json.loads(line)["step"] <= last_step))


def prepare_run_dir(cfg: RunConfig) -> Path:
    """Create/validate `cfg.output_dir` and write the resolved config to its config.yaml.

    Under torchrun rank 0 does this while the others wait; its errors stop every rank."""
    return dist.on_main(lambda: _prepare(cfg))


def _prepare(cfg: RunConfig) -> Path:
    run_dir = Path(cfg.output_dir)
    occupied = run_dir.is_dir() and any(run_dir.iterdir())
    if occupied and cfg.resume:
        _check_resumable(run_dir, cfg)
        checkpoint = latest_checkpoint(run_dir)
        _truncate_metrics(run_dir, int(checkpoint.name.split("-")[1]) if checkpoint else 0)
    elif occupied and cfg.overwrite:
        shutil.rmtree(run_dir)
    elif occupied:
        raise TrainingError(
            f"output_dir {run_dir} already holds a run. Set resume: true to continue it, "
            "overwrite: true to replace it, or choose another output_dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    return run_dir
