"""LoRA numerics: identity at init, merge/unmerge, disable, only-delta-changes, parameter count."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deltatune.deltas import LoraConfig, attach
from deltatune.deltas.lora import LoraLinear
from deltatune.errors import ConfigError

TOKENS = torch.randint(0, 2000, (2, 10), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def _randomise(deltas, std=0.05):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in deltas.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def test_identity_at_init_then_merge_unmerge_disable(tiny_llama):
    model, _ = tiny_llama
    model.eval()
    base = _logits(model)
    deltas = attach(model, LoraConfig(r=4, dropout=0.1))
    model.eval()
    assert torch.equal(_logits(model), base), "B = 0: the model is unchanged at step 0"
    _randomise(deltas)
    tuned = _logits(model)
    assert (tuned - base).abs().max() > 1e-3
    deltas.merge()
    torch.testing.assert_close(_logits(model), tuned, atol=1e-5, rtol=1e-5)
    deltas.merge()  # merging twice is a no-op
    torch.testing.assert_close(_logits(model), tuned, atol=1e-5, rtol=1e-5)
    with deltas.disabled():
        torch.testing.assert_close(_logits(model), base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(model), tuned, atol=1e-5, rtol=1e-5)
    deltas.unmerge()
    deltas.unmerge()
    torch.testing.assert_close(_logits(model), tuned, atol=1e-5, rtol=1e-5)
    with deltas.disabled():
        torch.testing.assert_close(_logits(model), base, atol=1e-5, rtol=1e-5)


def test_trainable_count_matches_formula_and_lm_head_is_skipped(tiny_llama):
    model, _ = tiny_llama
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    deltas = attach(model, LoraConfig(r=3))
    assert deltas.num_trainable() == sum(3 * (m.in_features + m.out_features) for m in linears.values())
    assert sorted(deltas[0].paths) == sorted(linears)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_only_lora_parameters_change_after_steps(tiny_llama):
    model, _ = tiny_llama
    deltas = attach(model, LoraConfig(r=4, dropout=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for _, p in deltas.named_parameters()], lr=1e-2)
    for _ in range(2):
        loss = model(input_ids=TOKENS, labels=TOKENS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= {n for n, _ in deltas.named_parameters()}
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


@pytest.mark.parametrize(
    ("target", "layers", "expected"),
    [
        (["q_proj", "v_proj"], None, {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                      "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}),
        (r"model\.layers\.1\.mlp\.(up|down)_proj", None, {"model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"}),
        (["o_proj"], [1], {"model.layers.1.self_attn.o_proj"}),
    ],
)
def test_targets_by_names_regex_and_layers(tiny_llama, target, layers, expected):
    model, _ = tiny_llama
    deltas = attach(model, LoraConfig(target=target, layers=layers))
    assert set(deltas[0].paths) == expected
    assert {n for n, m in model.named_modules() if isinstance(m, LoraLinear)} == expected


def test_unknown_target_names_the_modules_there(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ConfigError, match="matches no Linear module.*q_proj"):
        attach(model, LoraConfig(target=["query"]))


def test_scaling_and_rslora():
    layer = LoraLinear(nn.Linear(8, 6))
    layer.add_adapter("a", r=4, alpha=8, dropout=0.0, rslora=False, init="kaiming")
    layer.add_adapter("b", r=4, alpha=8, dropout=0.0, rslora=True, init="gaussian")
    assert layer.scaling == {"a": 2.0, "b": 4.0}
    nn.init.normal_(layer.lora_B["a"].weight)
    x = torch.randn(3, 8)
    layer.disabled_adapters.add("b")
    expected = layer.base_layer(x) + 2.0 * x @ layer.lora_A["a"].weight.T @ layer.lora_B["a"].weight.T
    torch.testing.assert_close(layer(x), expected)
    assert math.isclose(float(layer.lora_A["b"].weight.detach().std()), 1 / 4, rel_tol=0.5)


def test_two_named_lora_adapters_share_wrappers(tiny_llama):
    model, _ = tiny_llama
    model.eval()
    base = _logits(model)
    deltas = attach(model, [LoraConfig(r=2, dropout=0.0), LoraConfig(r=2, dropout=0.0)])
    assert [d.name for d in deltas] == ["default", "default_1"]
    _randomise(deltas)
    with deltas[0].disabled(), deltas[1].disabled():
        torch.testing.assert_close(_logits(model), base)
    assert not torch.allclose(_logits(model), base)


def test_public_api_round_trip(tmp_path):
    import deltatune

    model, tokenizer = deltatune.load_model("tiny-llama")
    deltas = deltatune.attach(model, deltatune.LoraConfig(r=2, target=["q_proj"]))
    _randomise(deltas)
    deltatune.save_deltas(deltas, tmp_path / "a", base_model="tiny-llama")
    loaded, _, again = deltatune.load_for_inference(None, tmp_path / "a", merge=True)
    model.eval()
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-5, rtol=1e-5)
    assert again[0].merged and deltatune.generate(loaded, tokenizer, ["hi"], max_new_tokens=2)[0] is not None
