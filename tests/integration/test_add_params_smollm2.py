"""The add-parameters family on the real SmolLM2-135M-Instruct: a short run of the demo (its data
and protocol) lowers eval loss for each mechanism: adapters inside the network, virtual tokens in
the input, keys/values in every attention layer."""

from __future__ import annotations

import functools

import pytest

from deltatune.data import build_sft_data, eval_batches
from deltatune.demo import demo_config
from deltatune.models import load_model
from deltatune.objectives.clm import lm_loss
from deltatune.recipes import run_stage
from deltatune.train.loop import evaluate

pytestmark = pytest.mark.integration

SHORT = ["train.max_steps=4", "train.eval_every=0", "train.save_every=0", "train.warmup=0"]


@functools.cache
def _eval_loss_before() -> float:
    cfg = demo_config("unused", SHORT)
    model, tokenizer = load_model(cfg.model)
    _, eval_rows, _ = build_sft_data(cfg.data, tokenizer)
    return evaluate(model, eval_batches(eval_rows, 8, tokenizer.pad_token_id), lm_loss, model.device)


@pytest.mark.parametrize(
    "method,lr,fraction,max_share",
    [
        ("adapter", 2e-3, 0.7, 0.02),  # 2 x 30 adapters of 2 x 576 x 36 + 612 parameters: 1.8%
        ("prompt", 3e-2, 0.9, 0.0002),  # 20 x 576 embeddings
        ("prefix", 1e-3, 0.5, 0.05),  # the reparameterisation MLP trains (its output, 0.2M, is saved)
    ],
)
def test_short_run_lowers_eval_loss(tmp_path, method, lr, fraction, max_share):
    before = _eval_loss_before()
    cfg = demo_config(str(tmp_path / "run"), [f"delta.method={method}", f"train.lr={lr}", *SHORT])
    summary = run_stage(cfg, lambda *_: None)
    assert summary["final_eval_loss"] < fraction * before
    assert 0 < summary["trainable_params"] / summary["total_params"] < max_share
