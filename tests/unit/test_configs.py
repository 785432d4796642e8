"""Every example config under configs/ parses, and runs a few steps with its model swapped for a tiny one."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltatune.config import load_config, read_yaml
from deltatune.recipes import run_stage

ROOT = Path(__file__).resolve().parents[2]
# the preference and RL examples need more than a model swap (a reward run, fewer layers, less data):
# tests/unit/test_rlhf_configs.py runs them
OWN_RUNNER = ("reward", "dpo", "ppo", "grpo")
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if read_yaml(p).get("stage") not in OWN_RUNNER)
TINY = {
    "smollm2-135m-instruct": "tiny-llama",
    "minilm-l6": "tiny-bert",
    "runs/mlm-tweets/model": "tiny-bert",  # written by configs/mlm-tweets.yaml (chain: tests/unit/test_stage_configs.py)
}


def test_there_are_example_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_runs_briefly_on_a_tiny_model(path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # data paths in the configs are relative to the repository root
    raw = read_yaml(path)
    overrides = [f"model={TINY.get(raw['model'], raw['model'])}", "train.max_steps=2", "train.eval_every=0",
                 "train.save_every=0", "data.max_samples=16", f"output_dir={tmp_path / 'run'}"]
    cfg = load_config(path, overrides)
    summary = run_stage(cfg, lambda *_: None)
    assert summary["steps"] == 2


def test_readme_config_reference_is_current():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(ROOT / "scripts/config_reference.py"), "--check"], capture_output=True)
    assert result.returncode == 0, "README config reference is stale: run python scripts/config_reference.py"
