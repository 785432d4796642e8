"""QLoRA: NF4/int8 base weights (levels, round trip, forward error), only LoRA trains, save/load,
and merging dequantizes instead of rounding the update away."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltatune.deltas import LoraConfig, attach
from deltatune.export.peft_format import load_deltas, save_deltas
from deltatune.models.quantize import (
    NF4_BLOCK,
    NF4_LEVELS,
    QuantizedLinear,
    dequantize_model,
    quantize_model,
    quantized_nbytes,
)

TOKENS = torch.randint(0, 2000, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def test_nf4_levels_are_the_papers_normal_quantiles():
    # QLoRA Appendix E / bitsandbytes create_normal_map: 8 positive and 7 negative quantiles of
    # N(0, 1) with offset 0.9677, plus an exact zero, normalised to [-1, 1].
    normal = torch.distributions.Normal(0.0, 1.0)
    offset = 0.9677083
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    assert torch.allclose(NF4_LEVELS.double(), levels / levels.abs().max(), atol=1e-6)


def test_nf4_rounds_each_weight_to_the_nearest_level_of_its_block():
    weight = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    layer = QuantizedLinear(_linear_with(weight), "nf4")
    blocks = weight.reshape(-1, NF4_BLOCK)
    scale = blocks.abs().amax(dim=1, keepdim=True)
    nearest = NF4_LEVELS[(blocks / scale)[..., None].sub(NF4_LEVELS).abs().argmin(-1)] * scale
    assert torch.allclose(layer.dequantize(), nearest.reshape(4, 32), atol=1e-6)
    assert layer.weight_codes.dtype == torch.uint8 and layer.weight_codes.numel() == 4 * 32 // 2
    assert torch.equal(layer.weight, layer.dequantize())
    assert sum(b.numel() * b.element_size() for b in layer.buffers()) == quantized_nbytes("nf4", 4, 32)


def _linear_with(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


@pytest.mark.parametrize(("kind", "bound"), [("nf4", 0.12), ("int8", 0.01)])
def test_round_trip_error_is_bounded_and_gradients_match_the_dequantized_weight(kind, bound):
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(96, 128, generator=gen) * 0.02, torch.randn(96, generator=gen)
    layer = QuantizedLinear(_linear_with(weight, bias), kind)
    rebuilt = layer.dequantize()
    assert (rebuilt - weight).norm() / weight.norm() < bound
    x = torch.randn(3, 5, 128, generator=gen, requires_grad=True)
    out = layer(x)
    out.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, rebuilt, bias).square().sum().backward()
    assert torch.allclose(out, F.linear(x_ref, rebuilt, bias), atol=1e-5)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-4)


@pytest.mark.parametrize(("kind", "bound"), [("nf4", 0.35), ("int8", 0.03)])
def test_quantized_model_forward_is_close_to_fp32_and_smaller(tiny_llama, kind, bound):
    model, _ = tiny_llama
    reference = _logits(model)
    linear_bytes = sum(m.weight.numel() * 4 for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n)
    count = quantize_model(model, kind)
    assert count == 2 * 7  # q k v o gate up down in each of the 2 blocks; the (tied) LM head stays
    quantized_bytes = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, QuantizedLinear) for b in m.buffers())
    assert quantized_bytes < linear_bytes * (0.15 if kind == "nf4" else 0.27)
    logits = _logits(model)
    assert (logits - reference).norm() / reference.norm() < bound


def test_only_lora_trains_and_the_adapter_round_trips(tiny_llama, tmp_path):
    model, _ = tiny_llama
    quantize_model(model, "nf4")
    deltas = attach(model, LoraConfig(r=4, dropout=0.0))
    codes = {n: b.clone() for n, b in model.named_buffers() if n.endswith(".weight_codes")}
    assert len(codes) == 14
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for _, p in deltas.named_parameters()], lr=1e-2)
    model.train()
    labels = TOKENS.clone()
    for _ in range(3):
        loss = model(input_ids=TOKENS, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(b, codes[n]) for n, b in model.named_buffers() if n in codes)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    tuned = _logits(model)

    save_deltas(deltas, tmp_path / "adapter", base_model="tiny-llama")
    from deltatune.models import load_model

    fresh, _ = load_model("tiny-llama", quantize="nf4")
    load_deltas(fresh, tmp_path / "adapter")
    assert torch.allclose(_logits(fresh), tuned, atol=1e-5)


def test_merge_dequantizes_instead_of_rounding_the_update_away(tiny_llama):
    model, _ = tiny_llama
    quantize_model(model, "nf4")
    deltas = attach(model, LoraConfig(r=4, dropout=0.0))
    with torch.no_grad():
        for name, p in deltas.named_parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    unmerged = _logits(model)
    layer = model.model.layers[0].self_attn.q_proj
    requantized = QuantizedLinear(_linear_with(layer.base_layer.dequantize() + layer.delta_weight("default")), "nf4")
    exact = layer.base_layer.dequantize() + layer.delta_weight("default")

    deltas.merge()
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules()), "merged model is full precision"
    merged = _logits(model)
    assert torch.allclose(merged, unmerged, atol=1e-4)
    assert torch.allclose(model.model.layers[0].self_attn.q_proj.base_layer.weight, exact, atol=1e-6)
    # what a merge into the 4-bit codes would have given: the update is mostly rounded away
    update = layer.delta_weight("default")
    lost = (requantized.dequantize() - exact).norm() / update.norm()
    assert lost > 0.3
    deltas.unmerge()
    assert torch.allclose(_logits(model), unmerged, atol=1e-4)


def test_dequantize_model_restores_plain_linears(tiny_llama):
    model, _ = tiny_llama
    quantize_model(model, "int8")
    quantized = _logits(model)
    assert dequantize_model(model) == 14
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert torch.allclose(_logits(model), quantized, atol=1e-5)


def test_qlora_sft_run_trains_and_saves_a_plain_lora_adapter(tiny_config):
    from deltatune.recipes import run_stage

    cfg = tiny_config("quantize=nf4", "train.max_steps=3")
    summary = run_stage(cfg, log=lambda _: None)
    assert summary["steps"] == 3
    adapter = cfg.output_dir + "/adapter/adapter_config.json"
    import json

    assert json.loads(open(adapter).read())["peft_type"] == "LORA"
