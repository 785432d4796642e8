"""The training loop: per-token accumulation, exact resume, signals, NaN, run-directory outputs."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from deltatune.config import load_config
from deltatune.errors import Interrupted, TrainingError
from deltatune.recipes import run_stage

QUIET = lambda *_: None  # noqa: E731


def test_run_directory_holds_everything(tiny_config, tmp_path):
    cfg = tiny_config("train.eval_every=2", "train.save_every=2")
    summary = run_stage(cfg, QUIET)
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss.png", "adapter/adapter_config.json", "adapter/chat_template.jinja",
                 "adapter/adapter_model.safetensors", "checkpoints/step-4/state.pt"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]
    assert {"step", "loss", "lr", "tokens_per_s"} <= lines[0].keys() and any("eval_loss" in r for r in lines)
    for key in ("trainable_params", "total_params", "final_loss", "final_eval_loss", "train_tokens",
                "tokens_per_s", "peak_memory_bytes", "wall_s"):
        assert summary[key] is not None, key
    assert summary == json.loads((run / "summary.json").read_text())
    assert load_config(run / "config.yaml") == cfg


def test_loss_falls_on_a_learnable_task(tiny_config):
    cfg = tiny_config("train.max_steps=25", "train.batch_size=8", "train.lr=3e-2", "train.warmup=0", "data.eval_split=0")
    summary = run_stage(cfg, QUIET)
    first = json.loads(open(os.path.join(cfg.output_dir, "metrics.jsonl")).readline())["loss"]
    assert summary["final_loss"] < 0.8 * first


def _one_step_grads(tiny_config, *overrides):
    """Gradients of the LoRA parameters after the first step's backward (captured before the update)."""
    captured = []  # in optimizer order, which follows the (deterministic) parameter order
    real_step = torch.optim.AdamW.step

    def capture(self, *args, **kwargs):
        if not captured:
            captured.extend(p.grad.detach().clone() for group in self.param_groups for p in group["params"])
        return real_step(self, *args, **kwargs)

    torch.optim.AdamW.step = capture
    try:
        run_stage(tiny_config("train.max_steps=1", "train.max_grad_norm=null", *overrides), QUIET)
    finally:
        torch.optim.AdamW.step = real_step
    return captured


def test_accumulation_equals_large_batch(tiny_config, tmp_path):
    """4 micro-batches of 2 give the gradient of one batch of 8 (loss normalised per token)."""
    big = _one_step_grads(tiny_config, "train.batch_size=8", "train.grad_accum=1", f"output_dir={tmp_path}/a", "data.eval_split=0")
    small = _one_step_grads(tiny_config, "train.batch_size=2", "train.grad_accum=4", f"output_dir={tmp_path}/b", "data.eval_split=0")
    assert len(big) == len(small) > 0
    for a, b in zip(big, small, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)
    assert max(float(g.abs().max()) for g in big) > 1e-4  # a real gradient was compared


def test_kill_and_resume_gives_bit_identical_weights(tiny_config, tmp_path, monkeypatch):
    common = ("train.max_steps=6", "delta.dropout=0.1", "train.save_every=2", "train.eval_every=3")
    run_stage(tiny_config(*common, f"output_dir={tmp_path}/straight"), QUIET)

    from deltatune.objectives import clm

    calls = {"n": 0}
    real = clm.lm_loss

    def signal_during_step_4(model, batch):
        calls["n"] += model.training
        if calls["n"] == 4 and model.training:
            os.kill(os.getpid(), signal.SIGTERM)  # what `kill` or a scheduler sends
        return real(model, batch)

    monkeypatch.setattr("deltatune.recipes.sft.lm_loss", signal_during_step_4)
    with pytest.raises(Interrupted) as info:
        run_stage(tiny_config(*common, f"output_dir={tmp_path}/killed"), QUIET)
    assert info.value.step == 4 and info.value.checkpoint.name == "step-4"
    monkeypatch.setattr("deltatune.recipes.sft.lm_loss", real)
    with pytest.raises(TrainingError, match="already holds a run"):
        run_stage(tiny_config(*common, f"output_dir={tmp_path}/killed"), QUIET)
    run_stage(tiny_config(*common, f"output_dir={tmp_path}/killed", "resume=true"), QUIET)

    straight = load_file(tmp_path / "straight/adapter/adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed/adapter/adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed/metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len([s for s in steps if s == 5]) == 1


def test_resume_refuses_a_different_run(tiny_config, tmp_path):
    run_stage(tiny_config("train.max_steps=2"), QUIET)
    with pytest.raises(TrainingError, match="different delta settings"):
        run_stage(tiny_config("train.max_steps=4", "delta.r=2", "resume=true"), QUIET)
    run_stage(tiny_config("train.max_steps=2", "overwrite=true"), QUIET)  # explicit replacement works


def test_nan_loss_stops_before_the_update_and_keeps_the_checkpoint(tiny_config, tmp_path, monkeypatch):
    from deltatune.objectives import clm

    calls = {"n": 0}

    def poisoned(model, batch):
        loss, count = clm.lm_loss(model, batch)
        calls["n"] += 1
        return (loss * float("nan"), count) if calls["n"] >= 3 else (loss, count)

    monkeypatch.setattr("deltatune.recipes.sft.lm_loss", poisoned)
    with pytest.raises(TrainingError, match=r"loss became nan at step 3.*Last good checkpoint: .*step-2"):
        run_stage(tiny_config("train.save_every=2", "data.eval_split=0"), QUIET)
    assert (tmp_path / "run/checkpoints/step-2/state.pt").is_file()
    assert not (tmp_path / "run/checkpoints/step-3").exists()
