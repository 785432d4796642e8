"""The fused LoRA branch: same values and gradients as dropout + two linears with the same mask;
mask rate; what it keeps for backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deltatune.deltas.lora_fused import keep_mask, lora_branch


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, 24, generator=gen, requires_grad=True)
    a = torch.randn(4, 24, generator=gen, requires_grad=True)
    b = torch.randn(10, 4, generator=gen, requires_grad=True)
    return x, a, b


def _grads(out, *tensors):
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
    return [t.grad.clone() for t in tensors]


def test_matches_dropout_then_two_linears_with_the_same_mask():
    for p in (0.0, 0.3):
        x, a, b = _inputs()
        torch.manual_seed(5)
        out = lora_branch(x, a, b, 2.5, p, training=True)
        fused = _grads(out, x, a, b)
        torch.manual_seed(5)
        mask = keep_mask(x.shape, p, x.device).float() if p else torch.ones_like(x)
        x2, a2, b2 = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
        ref = F.linear(F.linear(x2 * mask / (1 - p), a2), b2) * 2.5
        assert torch.allclose(out, ref, atol=1e-5)
        for got, want in zip(fused, _grads(ref, x2, a2, b2), strict=True):
            assert torch.allclose(got, want, atol=1e-4)


def test_mask_rate_and_eval_mode():
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([1000, 500]), 0.05, torch.device("cpu"))
    assert mask.dtype == torch.bool and abs(mask.float().mean().item() - 0.95) < 0.002
    x, a, b = _inputs()
    assert torch.equal(lora_branch(x, a, b, 1.0, 0.5, training=False), F.linear(F.linear(x, a), b))


def test_keeps_the_shared_input_and_a_byte_mask_not_fp32_copies():
    x, a, b = _inputs()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        for _ in range(3):  # q, k, v read the same x
            lora_branch(x, a, b, 1.0, 0.1, training=True)
    storages = {t.untyped_storage().data_ptr(): t for t in kept}
    float_bytes = sum(t.untyped_storage().nbytes() for t in storages.values() if t.dtype == torch.float32 and t.shape == x.shape)
    assert float_bytes == x.numel() * 4  # x once, no per-adapter dropped copies
    assert sum(1 for t in storages.values() if t.dtype in (torch.bool, torch.uint8) and t.shape == x.shape) == 3  # 1-byte masks
