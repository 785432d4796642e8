"""Real-model check per method family: a few SFT steps of SmolLM2-135M-Instruct on the demo data
lower the held-out eval loss, for a select-family method (BitFit, which adds biases to the
bias-less Llama projections) and a reparameterizing one ((IA)3)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "overrides",
    [
        ["delta.method=bitfit", "train.lr=5e-3"],
        ["delta.method=ia3", "train.lr=3e-2"],
    ],
    ids=["bitfit", "ia3"],
)
def test_short_run_lowers_eval_loss(overrides: list[str], tmp_path) -> None:
    from deltatune.data import build_sft_data, eval_batches
    from deltatune.demo import demo_config
    from deltatune.generate import load_for_inference
    from deltatune.objectives.clm import lm_loss
    from deltatune.recipes import run_stage
    from deltatune.train.loop import evaluate

    cfg = demo_config(
        str(tmp_path / "run"),
        [
            *overrides,
            "train.max_steps=3",
            "train.eval_every=0",
            "train.save_every=0",
            "train.warmup=0",
            "train.schedule=constant",
            "data.max_length=160",
        ],
    )
    summary = run_stage(cfg, log=lambda s: None)
    model, tokenizer, deltas = load_for_inference(None, cfg.output_dir, merge=False)
    _, eval_rows, _ = build_sft_data(cfg.data, tokenizer, cfg.train.seed)
    with deltas.disabled():
        base_loss = evaluate(model, eval_batches(eval_rows, 8, tokenizer.pad_token_id), lm_loss, model.device)
    share = 100 * summary["trainable_params"] / summary["total_params"]
    print(f"{overrides[0]}: trainable {summary['trainable_params']:,} ({share:.3f}%), eval loss {base_loss:.4f} -> {summary['final_eval_loss']:.4f}")
    assert 0 < share < 1
    assert summary["final_eval_loss"] < base_loss - 0.05
