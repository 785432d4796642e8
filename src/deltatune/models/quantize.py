"""Quantized frozen base weights for QLoRA: 4-bit NF4 or 8-bit absmax, dequantized on the fly.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) stores the frozen base model's Linear weights in
4-bit NormalFloat (NF4) and trains LoRA in full precision on top:

    h = dequant(W_q) x + (alpha / r) * B A x

NF4: each block of 64 consecutive weights is scaled by its absolute maximum into [-1, 1] and
every value rounded to the nearest of 16 levels placed at quantiles of a standard normal
(`NF4_LEVELS`, the table of the paper and bitsandbytes), so weights that are roughly normal use all
16 codes equally. Two 4-bit codes share a byte; a block's scale is one fp32 (0.5 bit per weight;
the paper's double quantisation of the scales would save another 0.37 bit and is left out for
clarity). int8: per output row, absmax scaled to [-127, 127].

The full-precision weight is rebuilt for each matmul and again in the backward pass (nothing of
size [out, in] is kept), so memory holds only the codes. Merging a delta into such a base would
round the merged weight back to 16 levels and lose most of the update (ANCHORS.md #7), so
`dequantize_model` first turns every quantized layer back into a full-precision `nn.Linear`
(the merge paths call it; see `Delta.merge`).

Implemented here rather than with torchao's NF4Tensor: on this CPU torchao's dequantisation took
2-6x longer (it is written for CUDA), and transformers imports torchao on every `from_pretrained`
once it is installed. The levels are checked against the paper's construction in the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "QUANTIZE_KINDS",
    "NF4_LEVELS",
    "NF4_BLOCK",
    "QuantizedLinear",
    "quantize_model",
    "dequantize_model",
    "quantized_nbytes",
    "is_quantized",
]

QUANTIZE_KINDS = ("none", "nf4", "int8")

NF4_LEVELS = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ]
)  # fmt: skip
"""The 16 NF4 levels (QLoRA paper, Appendix E; bitsandbytes `create_normal_map`)."""

NF4_BLOCK = 64
"""Weights per NF4 scale (the paper's block size)."""

# Byte -> (level of the high nibble, level of the low nibble): one lookup dequantizes two weights.
_NF4_PAIRS = torch.stack([NF4_LEVELS.repeat_interleave(16), NF4_LEVELS.repeat(16)], dim=1)


def quantized_nbytes(kind: str, out_features: int, in_features: int) -> int:
    """Bytes a quantized [out, in] weight occupies (codes + scales)."""
    n = out_features * in_features
    if kind == "nf4":
        return n // 2 + 4 * (n // NF4_BLOCK)
    if kind == "int8":
        return n + 4 * out_features
    raise ValueError(f"unknown quantization {kind!r}")


def _quantize_nf4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = weight.detach().float().reshape(-1, NF4_BLOCK)
    scale = blocks.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    levels = NF4_LEVELS.to(weight.device)
    codes = torch.bucketize(blocks / scale, (levels[1:] + levels[:-1]) / 2).to(torch.uint8).reshape(-1)
    return (codes[0::2] << 4) | codes[1::2], scale.reshape(-1)


def _quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class _DequantLinear(torch.autograd.Function):
    """y = x W^T with W rebuilt from its codes in forward and again in backward (never stored)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantize(grad.dtype), None


class QuantizedLinear(nn.Linear):
    """A frozen `nn.Linear` whose weight is stored as NF4 or int8 codes.

    Shapes: x [..., in] -> [..., out]. The buffer `weight_codes` holds the codes (uint8
    [out*in/2] for nf4, int8 [out, in] for int8) and `weight_scale` the fp32 scales. A subclass
    of `nn.Linear` so that deltas targeting Linear layers (LoRA's `all-linear`) wrap it like any
    other; reading `.weight` gives the dequantized full-precision weight (a new tensor each time:
    writing into it changes nothing, which is why merging dequantizes the layer first).
    """

    def __init__(self, linear: nn.Linear, kind: str) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: no full-precision weight is allocated
        if kind not in ("nf4", "int8"):
            raise ValueError(f"quantization must be nf4 or int8, got {kind!r}")
        if kind == "nf4" and linear.weight.numel() % NF4_BLOCK:
            raise ValueError(f"nf4 needs in*out divisible by {NF4_BLOCK}; got {tuple(linear.weight.shape)}")
        self.in_features, self.out_features, self.kind = linear.in_features, linear.out_features, kind
        self.compute_dtype = linear.weight.dtype
        codes, scale = (_quantize_nf4 if kind == "nf4" else _quantize_int8)(linear.weight)
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.dequantize()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full-precision weight [out, in] these codes stand for."""
        if self.kind == "nf4":
            pairs = _NF4_PAIRS.to(self.weight_codes.device)
            # index_select with int32 indices is ~2x faster on CPU than advanced indexing with int64
            values = pairs.index_select(0, self.weight_codes.int()).reshape(-1, NF4_BLOCK)
            weight = (values * self.weight_scale[:, None]).reshape(self.out_features, self.in_features)
        else:
            weight = self.weight_codes.float() * self.weight_scale[:, None]
        return weight.to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _DequantLinear.apply(x, self)
        return out if self.bias is None else out + self.bias

    def to_linear(self) -> nn.Linear:
        """A full-precision `nn.Linear` with the dequantized weight (and the same bias)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.dequantize(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quantization={self.kind}"


def quantize_model(model: nn.Module, kind: str) -> int:
    """Replace the model's Linear layers (except the LM head and task heads) by frozen
    `QuantizedLinear`s in place, before any delta is attached. Returns how many were replaced."""
    if kind == "none":
        return 0
    if kind not in QUANTIZE_KINDS:
        raise ValueError(f"quantize must be one of {QUANTIZE_KINDS}, got {kind!r}")
    from deltatune.deltas.inject import _is_head, set_module

    targets = [
        path
        for path, module in model.named_modules()
        if type(module) is nn.Linear and not _is_head(model, path, module)
        and (kind == "int8" or module.weight.numel() % NF4_BLOCK == 0)
    ]
    for path in targets:
        set_module(model, path, QuantizedLinear(model.get_submodule(path), kind))
    # transformers maps safetensors checkpoints into memory; quantizing read every page of the
    # full-precision weights, which stay resident while any tensor still points into the file.
    # Copying the few weights left (embeddings, norms) lets the mapping go: -430 MB RSS on SmolLM2.
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
    return len(targets)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def dequantize_model(model: nn.Module) -> int:
    """Turn every `QuantizedLinear` (also inside delta wrappers) back into a full-precision
    `nn.Linear`, so that merging or exporting works on real-valued weights. Returns the count."""
    from deltatune.deltas.inject import set_module

    paths = [path for path, module in model.named_modules() if isinstance(module, QuantizedLinear)]
    for path in paths:
        set_module(model, path, model.get_submodule(path).to_linear())
    return len(paths)
