"""The example configs of the preference and RL stages parse, and run for a few steps on tiny-llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deltatune.config import load_config, read_yaml
from deltatune.recipes import run_stage

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("reward", "dpo", "ppo", "grpo")
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if read_yaml(p).get("stage") in STAGES)
TINY = ["model=tiny-llama", "delta.layers=null", "train.max_steps=2", "train.batch_size=2", "train.eval_every=0",
        "data.max_length=64"]
RL = ["{stage}.prompts_per_step=2", "{stage}.max_new_tokens=4", "{stage}.eval_prompts=2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(path: Path, output_dir: Path, *extra: str):
    """The example at `path` on tiny-llama for two steps, its data files cut to their first 12 records
    and its paths made absolute (they are relative to the repository root)."""
    raw = read_yaml(path)
    stage = raw["stage"]
    overrides = [*TINY, f"output_dir={output_dir}"]
    for split in ("train", "eval"):
        source = raw.get("data", {}).get(split)
        if source:
            lines = (ROOT / source).read_text().splitlines(keepends=True)[:12]
            cut = output_dir.parent / f"{output_dir.name}-{split}.jsonl"
            cut.parent.mkdir(parents=True, exist_ok=True)
            cut.write_text("".join(lines))
            overrides.append(f"data.{split}={cut}")
    if stage in ("ppo", "grpo"):
        overrides += [o.format(stage=stage) for o in RL]
        for key in ("reward_fn", "eval_reward_fn"):
            value = raw[stage].get(key)
            if value and ".py:" in value:
                overrides.append(f"{stage}.{key}={ROOT / value}")
    return load_config(path, [*overrides, *extra])


@pytest.fixture(scope="module")
def tiny_reward_run(tmp_path_factory) -> Path:
    """configs/reward-smollm2.yaml, shrunk to tiny-llama: the reward source of the PPO example."""
    out = tmp_path_factory.mktemp("reward") / "run"
    run_stage(tiny(ROOT / "configs" / "reward-smollm2.yaml", out), lambda *_: None)
    return out


def test_there_is_an_example_per_stage():
    assert {read_yaml(p)["stage"] for p in CONFIGS} == set(STAGES)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_config_runs_on_a_tiny_model(path, tmp_path, request):
    full = load_config(path)  # the example as written validates
    assert full.model == "smollm2-135m-instruct"
    extra = [f"ppo.reward_model={request.getfixturevalue('tiny_reward_run')}"] if full.stage == "ppo" else []
    cfg = tiny(path, tmp_path / "run", *extra)
    summary = run_stage(cfg, lambda *_: None)
    assert summary["stage"] == full.stage and summary["steps"] == 2
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged and all(v == v for r in logged for v in r.values() if isinstance(v, float))  # no NaN
