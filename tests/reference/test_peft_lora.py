"""PEFT as the oracle: our LoRA adapters load in peft with equal logits, and peft's load here."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from deltatune.deltas import LoraConfig, attach
from deltatune.export.peft_format import load_deltas, save_deltas
from deltatune.models import load_model

TOKENS = torch.randint(0, 2000, (2, 9), generator=torch.Generator().manual_seed(0))


def _fresh():
    model, _ = load_model("tiny-llama")
    return model.eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=4, alpha=8, dropout=0.0),
        LoraConfig(r=2, alpha=16, dropout=0.0, rslora=True, target=["q_proj", "v_proj"]),
        LoraConfig(r=3, alpha=6, dropout=0.0, target=r"model\.layers\.1\.mlp\.\w+_proj"),
        LoraConfig(r=2, alpha=4, dropout=0.0, target=["k_proj"], layers=[0]),
    ],
    ids=["all-linear", "rslora-names", "regex", "layers"],
)
def test_ours_loads_in_peft_with_equal_logits(tmp_path, config):
    model = _fresh()
    deltas = attach(model, config)
    with torch.no_grad():
        for _, p in deltas.named_parameters():
            p.normal_(std=0.05)
    model.eval()
    ours = _logits(model)
    save_deltas(deltas, tmp_path / "adapter", base_model="tiny-llama")
    peft_model = PeftModel.from_pretrained(_fresh(), tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(peft_model), ours, atol=1e-6, rtol=1e-5)
    n_peft = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert n_peft == deltas.num_trainable()


def test_peft_adapter_loads_here_with_equal_logits(tmp_path):
    peft_model = get_peft_model(
        _fresh(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], lora_dropout=0.0, use_rslora=True)
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.05)
    peft_model.eval()
    expected = _logits(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    model = _fresh()
    deltas = load_deltas(model, tmp_path / "peft")
    model.eval()
    torch.testing.assert_close(_logits(model), expected, atol=1e-6, rtol=1e-5)
    assert deltas[0].config.rslora and sorted(deltas[0].config.target) == ["q_proj", "up_proj"]


def test_adapter_for_another_model_gets_a_clear_error(tmp_path):
    from deltatune.errors import UserError

    model = _fresh()
    save_deltas(attach(model, LoraConfig(r=2)), tmp_path / "a", base_model="tiny-llama")
    other, _ = load_model("tiny-llama", hidden_size=32, intermediate_size=64)
    with pytest.raises(UserError, match="different base model"):
        load_deltas(other, tmp_path / "a")
