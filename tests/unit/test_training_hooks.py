"""The loop's delta hooks: gradual unfreezing (per-step trainable set, exact resume), diff pruning's
L0 regulariser and end-of-training projection (sparse on disk), full fine-tuning's model
directory, composed deltas from a config, and `deltatune inspect`."""

from __future__ import annotations

import copy
import functools
import math
import shutil

import torch
from safetensors.torch import load_file
from torch import nn

from deltatune.config import TrainConfig, load_config
from deltatune.data.collate import Row
from deltatune.data.loader import BatchStream
from deltatune.deltas import attach
from deltatune.deltas.diffprune import BETA, GAMMA, ZETA, DiffPruneConfig, hard_concrete
from deltatune.deltas.freezing import FreezeConfig
from deltatune.deltas.full import FullConfig
from deltatune.export.outputs import save_outputs
from deltatune.export.peft_format import load_deltas, save_deltas
from deltatune.objectives.clm import count_label_tokens, lm_loss
from deltatune.train.loop import train


@functools.cache
def _base() -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.15,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval()


def _stream() -> BatchStream:
    g = torch.Generator().manual_seed(0)
    rows = [Row(ids := torch.randint(1, 256, (10,), generator=g).tolist(), ids) for _ in range(8)]
    return BatchStream(rows, batch_size=2, pad_id=0, seed=0)


def _train(model, deltas, run_dir, resume: bool = False, **cfg):
    config = TrainConfig(**{"lr": 1e-2, "warmup": 0, "max_grad_norm": None, **cfg})
    return train(model, deltas, _stream(), lm_loss, lambda b: count_label_tokens(b["labels"]), config, run_dir, resume=resume, log=lambda s: None)


def _changed(before: nn.Module, after: nn.Module) -> set[str]:
    old = dict(before.named_parameters())
    return {n for n, p in after.named_parameters() if not torch.equal(p, old[n])}


def test_gradual_unfreezing_follows_the_schedule(tmp_path) -> None:
    config = FreezeConfig(trainable_layers=2, unfreeze_every=2)
    model = copy.deepcopy(_base())
    deltas = attach(model, config)
    freeze = deltas[0]
    assert [len(g) for g in freeze.groups] == [1, 9, 9]  # final norm; block 1; block 0
    assert [freeze.active_groups(s) for s in range(1, 8)] == [1, 1, 2, 2, 3, 3, 3]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model.norm.weight"}  # before the first step: the head alone

    for steps, expected_blocks in ((2, set()), (4, {"1"}), (6, {"0", "1"})):
        model = copy.deepcopy(_base())
        deltas = attach(model, config)
        _train(model, deltas, tmp_path / f"run{steps}", max_steps=steps)
        changed = _changed(_base(), model)
        assert "model.norm.weight" in changed
        assert {n.split(".")[2] for n in changed if n.startswith("model.layers.")} == expected_blocks
        assert "model.embed_tokens.weight" not in changed


def test_resume_continues_the_schedule_exactly(tmp_path) -> None:
    config = FreezeConfig(trainable_layers=2, unfreeze_every=2)
    run_dir = tmp_path / "run"
    model = copy.deepcopy(_base())
    deltas = attach(model, config)
    _train(model, deltas, run_dir, max_steps=6, save_every=3, keep_checkpoints=5)
    straight = {k: v.clone() for k, v in deltas.state_dict().items()}
    shutil.rmtree(run_dir / "checkpoints" / "step-6")

    model = copy.deepcopy(_base())
    deltas = attach(model, config)
    result = _train(model, deltas, run_dir, resume=True, max_steps=6, save_every=3, keep_checkpoints=5)
    assert [h["step"] for h in result.history] == [4, 5, 6]  # resumed from step 3, in the block-1 phase
    for name, value in deltas.state_dict().items():
        torch.testing.assert_close(value, straight[name], atol=0, rtol=0)


def test_hard_concrete_and_l0_by_hand() -> None:
    log_alpha = torch.tensor([0.0, 10.0, -10.0])
    # eval gate: clamp(sigmoid(a) (zeta - gamma) + gamma, 0, 1)
    torch.testing.assert_close(hard_concrete(log_alpha, training=False), torch.tensor([0.5, 1.0, 0.0]))
    samples = hard_concrete(torch.zeros(20000), training=True)
    assert samples.min() >= 0 and samples.max() <= 1
    # P(z = 0) for log_alpha = 0: P(s < -gamma / (zeta - gamma)) = sigmoid(beta * logit(1/12)) = 0.1657
    expected = 1 / (1 + math.exp(-BETA * math.log((1 / 12) / (11 / 12))))
    assert abs(float((samples == 0).float().mean()) - expected) < 0.015
    assert GAMMA < 0 < 1 < ZETA


def test_diffprune_regulariser_projection_and_sparse_file(tmp_path) -> None:
    config = DiffPruneConfig(target_sparsity=0.01, l0_lambda=1e-4, log_alpha_init=5.0)
    model = copy.deepcopy(_base())
    deltas = attach(model, config)
    prune = deltas[0]
    chosen = sum(p.numel() for n, p in prune.named_parameters() if "diff_w" in n)
    # at init every log_alpha is 5: R = lambda * N * sigmoid(5 - beta log(-gamma / zeta))
    by_hand = 1e-4 * chosen / (1 + math.exp(-(5.0 - BETA * math.log(-GAMMA / ZETA))))
    torch.testing.assert_close(float(deltas.regularizer()), by_hand, rtol=1e-5, atol=0)

    result = _train(model, deltas, tmp_path / "run", max_steps=4)
    assert all("regularizer" in h for h in result.history)
    budget = math.ceil(0.01 * chosen)
    assert prune.nonzero() == budget  # projected by the loop's on_train_end
    assert deltas.regularizer() is None
    expected = model(input_ids=torch.arange(1, 11)[None]).logits

    save_deltas(deltas, tmp_path / "adapter", base_model="tiny")
    stored = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert sum(v.numel() for k, v in stored.items() if k.endswith("diff_values")) == budget
    assert {k.rsplit(".", 1)[-1] for k in stored} == {"diff_indices", "diff_values"}
    fresh = copy.deepcopy(_base())
    load_deltas(fresh, tmp_path / "adapter")
    torch.testing.assert_close(fresh(input_ids=torch.arange(1, 11)[None]).logits, expected, atol=1e-6, rtol=0)


def test_full_writes_a_transformers_model_directory(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = copy.deepcopy(_base())
    deltas = attach(model, [FullConfig()])
    _train(model, deltas, tmp_path / "run", max_steps=2)
    saved = save_outputs(deltas, tmp_path / "run", base_model="tiny")
    assert set(saved) == {"adapter", "model"}
    reloaded = AutoModelForCausalLM.from_pretrained(saved["model"]).eval()
    ids = torch.arange(1, 11)[None]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-6, rtol=0)
        with deltas.disabled():  # the kept copy gives the base model back
            torch.testing.assert_close(model(input_ids=ids).logits, _base()(input_ids=ids).logits, atol=0, rtol=0)


def test_sft_with_composed_deltas_and_full_model_export(tiny_config) -> None:
    """A real SFT run (tiny-llama, real tokenizer) with `delta: [full]` written by the recipe, and a
    config with a list of deltas validated into both methods."""
    from transformers import AutoModelForCausalLM

    from deltatune.inference import load_for_inference
    from deltatune.recipes import run_stage

    cfg = tiny_config("train.max_steps=2", "train.lr=1e-4")
    cfg = cfg.model_copy(update={"delta": [FullConfig()]})
    summary = run_stage(cfg, log=lambda s: None)
    run_dir = cfg.output_dir
    assert summary["trainable_params"] == summary["total_params"]
    exported = AutoModelForCausalLM.from_pretrained(f"{run_dir}/model").eval()
    tuned, tokenizer, _ = load_for_inference(None, run_dir)
    ids = tokenizer("Reverse apple", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, tuned(input_ids=ids).logits, atol=1e-5, rtol=0)

    composed = load_config(None, ["model=tiny-llama"], base={"delta": [{"method": "lora", "r": 2}, "bitfit"]})
    assert [d.method for d in composed.delta] == ["lora", "bitfit"]


def test_inspect_cli_reports_counts_places_and_merge(tmp_path) -> None:
    from typer.testing import CliRunner

    from deltatune.cli.main import app

    path = tmp_path / "cfg.yaml"
    path.write_text("model: tiny-llama\ndelta:\n  - {method: lora, r: 2, target: [q_proj, embed_tokens]}\n  - {method: ia3}\n")
    result = CliRunner().invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    # tiny-llama: hidden 64, q_proj 64 -> 64, vocab 49152; LoRA r (in + out) per module
    lora = 2 * 2 * (64 + 64) + 2 * (49152 + 64)
    ia3 = 2 * (32 + 32 + 128)  # k, v outputs (2 kv heads x 16) + down_proj input, per block
    assert f"delta lora ('default'): {lora:,} trainable parameters" in result.output
    assert "not mergeable" in result.output  # a LoRA on the tied input embedding
    assert f"delta ia3 ('default'): {ia3:,} trainable parameters" in result.output
    assert "model.layers.*.self_attn.q_proj" in result.output and "model.embed_tokens" in result.output


def test_changing_method_in_overrides_starts_from_its_defaults() -> None:
    from deltatune.demo import demo_config

    assert demo_config("unused", ["delta.method=ia3"]).delta[0].model_dump() == {
        "method": "ia3", "target": "auto", "feedforward": "auto", "layers": None,
    }
    lora = demo_config("unused", ["delta.use_dora=true"]).delta[0]
    assert (lora.method, lora.r, lora.dropout, lora.use_dora) == ("lora", 8, 0.0, True)  # the demo's LoRA options kept
    cfg = load_config(None, ["model=m", "delta.1.method=freeze"], base={"delta": [{"method": "lora", "r": 2}, {"method": "bitfit", "head": False}]})
    assert [d.method for d in cfg.delta] == ["lora", "freeze"] and cfg.delta[0].r == 2
