"""Named adapters on one base: load, switch, disable, delete, weighted LoRA merges, mixed batches."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from deltatune.deltas import attach
from deltatune.deltas.adapters import Adapters
from deltatune.deltas.bitfit import BitfitConfig
from deltatune.deltas.ia3 import IA3Config
from deltatune.deltas.layer import DeltaLayer, find_layer
from deltatune.deltas.lora import LoraConfig, LoraLayer
from deltatune.export.peft_format import save_deltas


@functools.cache
def _base() -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval()


IDS = torch.randint(1, 256, (4, 9), generator=torch.Generator().manual_seed(0))


def _logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _trained(config, seed: int, tmp_path, name: str):
    """A saved adapter with non-trivial weights, and the logits of base + it alone."""
    model = copy.deepcopy(_base())
    deltas = attach(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in deltas.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    save_deltas(deltas, tmp_path / name, base_model="tiny")
    return tmp_path / name, _logits(model)


@pytest.fixture
def bank(tmp_path):
    """Base + LoRA `a`, LoRA `b` (other rank and targets) and IA3 `c`, with each one's solo logits."""
    dirs, solo = {}, {}
    for name, config, seed in (
        ("a", LoraConfig(r=4, dropout=0.0), 1),
        ("b", LoraConfig(r=4, dropout=0.0, target=["q_proj", "v_proj", "up_proj"]), 2),
        ("c", IA3Config(), 3),
    ):
        dirs[name], solo[name] = _trained(config, seed, tmp_path, name)
    adapters = Adapters(copy.deepcopy(_base()))
    for name in dirs:
        adapters.load(dirs[name], name=name)
    return adapters, solo


def test_load_switch_disable_delete(bank) -> None:
    adapters, solo = bank
    model = adapters.model
    assert adapters.names == ["a", "b", "c"] and adapters.active == ["a"]  # the first loaded is active
    torch.testing.assert_close(_logits(model), solo["a"], atol=1e-5, rtol=0)
    for name in ("b", "c", "a"):
        adapters.activate(name)
        torch.testing.assert_close(_logits(model), solo[name], atol=1e-5, rtol=0)
    with adapters.disabled():
        torch.testing.assert_close(_logits(model), _logits(_base()), atol=1e-6, rtol=0)
    assert adapters.active == ["a"]
    adapters["a"].merge()  # switching away from a merged adapter unmerges it first
    adapters.activate("b")
    torch.testing.assert_close(_logits(model), solo["b"], atol=1e-5, rtol=0)

    adapters.delete("a")
    assert not any(".a." in f"{n}." for n, _ in model.named_parameters())
    torch.testing.assert_close(_logits(model), solo["b"], atol=1e-5, rtol=0)
    adapters.delete("b")
    adapters.delete("c")
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())  # every wrapper taken out
    torch.testing.assert_close(_logits(model), _logits(_base()), atol=1e-6, rtol=0)
    with pytest.raises(KeyError, match="no adapter named 'a'"):
        adapters.activate("a")


def test_mixed_batch_equals_each_example_alone(bank) -> None:
    adapters, solo = bank
    names = ["a", None, "c", "b"]
    with adapters.mixed_batch(names):
        mixed = _logits(adapters.model)
    assert adapters.active == ["a"]
    for row, name in enumerate(names):
        if name is None:
            expected = _logits(_base(), IDS[row : row + 1])
        else:
            expected = solo[name][row : row + 1]
        torch.testing.assert_close(mixed[row : row + 1], expected, atol=1e-5, rtol=0)


def test_mixed_batch_refuses_methods_that_cannot_route(tmp_path) -> None:
    adapters = Adapters(copy.deepcopy(_base()))
    adapters.add("a", LoraConfig(r=2))
    adapters.add("bias", BitfitConfig())
    with pytest.raises(TypeError, match="does not support mixed-adapter batches"):
        with adapters.mixed_batch(["a", "bias"]):
            pass


def _delta_weights(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and name in module.adapter_names:
            out[path.replace(".base_layer", "")] = module.delta_weight(name)  # IA3 `c` wraps some LoRA layers
    return out


@pytest.mark.parametrize("combination", ["cat", "svd"])
def test_weighted_merge_is_the_weighted_sum(bank, combination: str) -> None:
    adapters, _ = bank
    weights = {"a": 0.7, "b": -0.4}
    # svd at full rank (8 = 4 + 4) reproduces the weighted sum exactly, like cat.
    adapters.add_weighted(weights, "mix", combination=combination, r=8 if combination == "svd" else None)
    model = adapters.model
    mixed = _delta_weights(model, "mix")
    parts = {n: _delta_weights(model, n) for n in weights}
    assert set(mixed) == set(parts["a"]) | set(parts["b"])
    for path, update in mixed.items():
        expected = sum(w * parts[n][path] for n, w in weights.items() if path in parts[n])
        torch.testing.assert_close(update, expected, atol=1e-5, rtol=0)
    adapters.activate("mix")
    assert adapters.active == ["mix"]


@pytest.mark.parametrize("combination", ["linear", "svd"])
def test_weighted_merge_matches_peft(bank, combination: str, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    adapters, _ = bank
    for name in ("a", "b"):
        save_deltas(adapters[name], tmp_path / name, base_model="tiny")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(_base()), tmp_path / "a", adapter_name="a")
    reference.load_adapter(tmp_path / "b", adapter_name="b")
    same_rank = {"a": 0.6, "b": 0.5}
    reference.add_weighted_adapter(list(same_rank), list(same_rank.values()), "mix", combination_type=combination)
    adapters.add_weighted(same_rank, "mix", combination=combination)
    ours = _delta_weights(adapters.model, "mix")
    for path, update in ours.items():
        theirs = reference.base_model.model.get_submodule(path).get_delta_weight("mix")
        if combination == "svd":  # singular vectors have a sign freedom: compare the products
            torch.testing.assert_close(update, theirs, atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(update, theirs, atol=1e-6, rtol=0)
    layer = find_layer(adapters.model, "model.layers.0.self_attn.q_proj", LoraLayer)
    assert layer.scaling["mix"] == 1.0
