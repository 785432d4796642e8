"""Real-model check per method family: a few optimizer steps on SmolLM2-135M-Instruct with the demo's
data lower the eval loss, for select-family methods (BitFit, which adds biases to the bias-less
Llama projections; layer freezing) and a reparameterizing one ((IA)3; LoRA has its own SmolLM2
test), with the trainable share reported. The model is loaded once; each method trains on its own copy through the real loop."""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 135M model on a shared 2-core machine: one thread is ~5x faster than two fighting
    yield _load()
    torch.set_num_threads(threads)


def _load():
    from deltatune.data import build_sft_data, eval_batches
    from deltatune.demo import demo_config
    from deltatune.models import load_model
    from deltatune.objectives.clm import lm_loss
    from deltatune.train.loop import evaluate

    cfg = demo_config("unused", ["data.max_length=128"])
    model, tokenizer = load_model(cfg.model)
    train_rows, eval_rows, _ = build_sft_data(cfg.data, tokenizer, seed=0)
    eval_rows = eval_rows[:4]
    base_loss = evaluate(model, eval_batches(eval_rows, 4, tokenizer.pad_token_id), lm_loss, torch.device("cpu"))
    return model, tokenizer, train_rows[:16], eval_rows, base_loss


@pytest.mark.parametrize(
    "delta,lr",
    [
        ({"method": "bitfit"}, 5e-3),
        ({"method": "freeze", "trainable_layers": 2}, 3e-4),
        ({"method": "ia3"}, 3e-2),
    ],
    ids=["bitfit", "freeze", "ia3"],
)
def test_short_run_lowers_eval_loss(smollm, delta, lr, tmp_path) -> None:
    from deltatune.config import TrainConfig
    from deltatune.data import BatchStream, eval_batches
    from deltatune.deltas import attach
    from deltatune.deltas.registry import delta_config_class
    from deltatune.objectives.clm import count_label_tokens, lm_loss
    from deltatune.train.loop import evaluate, train

    base_model, tokenizer, train_rows, eval_rows, base_loss = smollm
    model = copy.deepcopy(base_model)
    deltas = attach(model, delta_config_class(delta["method"]).model_validate(delta))
    stream = BatchStream(train_rows, 2, tokenizer.pad_token_id, seed=0)
    cfg = TrainConfig(max_steps=3, lr=lr, warmup=0, schedule="constant")
    train(model, deltas, stream, lm_loss, lambda b: count_label_tokens(b["labels"]), cfg, tmp_path, log=lambda s: None)
    tuned_loss = evaluate(model, eval_batches(eval_rows, 4, tokenizer.pad_token_id), lm_loss, torch.device("cpu"))
    share = 100 * deltas.num_trainable() / sum(p.numel() for p in base_model.parameters())
    print(f"{delta['method']}: {deltas.num_trainable():,} trainable ({share:.3f}%), eval loss {base_loss:.3f} -> {tuned_loss:.3f}")
    assert 0 < share < 15
    assert tuned_loss < base_loss - 0.1
