"""The real SmolLM2-135M-Instruct (packaged GGUF): loads, answers, and a short LoRA run lowers eval loss."""

from __future__ import annotations

import pytest

from deltatune.data import build_sft_data, eval_batches
from deltatune.demo import demo_config
from deltatune.inference import generate
from deltatune.models import load_model
from deltatune.objectives.clm import lm_loss
from deltatune.recipes import run_stage
from deltatune.train.loop import evaluate

pytestmark = pytest.mark.integration


def test_packaged_model_answers_like_the_original():
    model, tokenizer = load_model("smollm2-135m-instruct")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    (answer,) = generate(model.eval(), tokenizer, ["What is the capital of France?"], max_new_tokens=12)
    assert answer == "The capital of France is Paris."


def test_short_lora_run_lowers_eval_loss(tmp_path):
    cfg = demo_config(str(tmp_path / "run"), ["train.max_steps=4", "data.max_length=256", "train.eval_every=0", "train.save_every=0", "train.warmup=0"])
    model, tokenizer = load_model(cfg.model)
    _, eval_rows, _ = build_sft_data(cfg.data, tokenizer)
    before = evaluate(model, eval_batches(eval_rows, 8, tokenizer.pad_token_id), lm_loss, model.device)
    summary = run_stage(cfg, lambda *_: None)
    assert summary["final_eval_loss"] < 0.7 * before
    assert 0.01 < summary["trainable_params"] / summary["total_params"] < 0.03
