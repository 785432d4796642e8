"""PEFT as the oracle: our LoRA variants and (IA)3 load in peft.PeftModel with equal logits, and
adapters PEFT saves load here with equal logits."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from deltatune.deltas import attach
from deltatune.deltas.ia3 import IA3Config
from deltatune.deltas.lora import LoraConfig
from deltatune.export.peft_format import load_deltas, save_deltas

peft = pytest.importorskip("peft")


@functools.cache
def _base(family: str) -> nn.Module:
    import transformers

    shapes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if family == "llama":
            config = transformers.LlamaConfig(vocab_size=256, num_key_value_heads=2, tie_word_embeddings=True, **shapes)
            return transformers.LlamaForCausalLM(config).eval()
        config = transformers.BertConfig(vocab_size=512, num_labels=3, **shapes)
        return transformers.BertForSequenceClassification(config).eval()


IDS = torch.randint(1, 256, (2, 10), generator=torch.Generator().manual_seed(0))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _perturb(params) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


# (our config, the same adapter as PEFT's config kwargs or None when PEFT has no equivalent init, family)
CASES = {
    "dora": (dict(r=4, alpha=8, dropout=0.0, use_dora=True), dict(use_dora=True), "llama"),
    "rslora": (dict(r=4, alpha=8, dropout=0.0, rslora=True), dict(use_rslora=True), "llama"),
    "rank_pattern": (
        dict(r=4, alpha=8, dropout=0.0, rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.up_proj": 6}, alpha_pattern={"q_proj": 3}),
        dict(rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.up_proj": 6}, alpha_pattern={"q_proj": 3}),
        "llama",
    ),
    "embedding": (dict(r=4, alpha=8, dropout=0.0, target=["embed_tokens", "q_proj"]), dict(target_modules=["embed_tokens", "q_proj"]), "llama"),
    "bert-embedding": (
        dict(r=4, alpha=8, dropout=0.0, target=["word_embeddings", "value"]),
        dict(target_modules=["word_embeddings", "value"]),
        "bert",
    ),
    # PiSSA is written as the equivalent plain LoRA of rank 2r on the original weights.
    "pissa": (dict(r=4, alpha=8, dropout=0.0, init="pissa", target=["q_proj", "o_proj"]), None, "llama"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_our_lora_loads_in_peft(name: str, tmp_path) -> None:
    ours, _, family = CASES[name]
    model = copy.deepcopy(_base(family))
    deltas = attach(model, LoraConfig(**ours))
    _perturb(p for _, p in deltas.named_parameters())
    expected = _logits(model)
    save_deltas(deltas, tmp_path, base_model=family)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(_base(family)), tmp_path).eval()
    torch.testing.assert_close(_logits(theirs), expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c[1] is not None])
def test_peft_lora_loads_here(name: str, tmp_path) -> None:
    ours, theirs_kwargs, family = CASES[name]
    kwargs = dict(r=ours["r"], lora_alpha=ours["alpha"], lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(_base(family)), peft.LoraConfig(**{**kwargs, **theirs_kwargs}))
    _perturb(p for _, p in model.named_parameters() if p.requires_grad)
    expected = _logits(model.eval())
    model.save_pretrained(tmp_path)
    here = copy.deepcopy(_base(family))
    deltas = load_deltas(here, tmp_path)
    torch.testing.assert_close(_logits(here), expected, atol=2e-5, rtol=0)
    assert deltas[0].config.use_dora == theirs_kwargs.get("use_dora", False)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_ia3_round_trips_with_peft(family: str, tmp_path) -> None:
    # ours -> PEFT
    model = copy.deepcopy(_base(family))
    deltas = attach(model, IA3Config())
    _perturb(p for _, p in deltas.named_parameters())
    expected = _logits(model)
    save_deltas(deltas, tmp_path / "ours", base_model=family)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(_base(family)), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(theirs), expected, atol=2e-5, rtol=0)
    # PEFT (its default IA3 targets for the architecture) -> ours
    peft_model = peft.get_peft_model(copy.deepcopy(_base(family)), peft.IA3Config())
    _perturb(p for _, p in peft_model.named_parameters() if p.requires_grad)
    expected = _logits(peft_model.eval())
    peft_model.save_pretrained(tmp_path / "theirs")
    here = copy.deepcopy(_base(family))
    load_deltas(here, tmp_path / "theirs")
    torch.testing.assert_close(_logits(here), expected, atol=2e-5, rtol=0)
