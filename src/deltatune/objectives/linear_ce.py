"""Cross-entropy through the LM head, in chunks, without keeping the logits.

The usual path computes logits = h W^T for all N target positions ([N, V] fp32: 49k columns for
SmolLM2, 200 MB per 1,000 tokens), keeps the log-softmax for backward and allocates its gradient
again in backward: three [N, V] tensors at the peak of the step. Here the rows go through the
head a chunk at a time, and each chunk's gradient (softmax - one-hot) is turned into dL/dh (and
dL/dW when the head trains) right away, in the forward pass; backward only scales them by the
incoming gradient. Peak extra memory is one [chunk, V] block. The same idea as the fused linear
cross-entropy of Liger-Kernel (Hsu et al. 2024, arXiv:2410.10989) and torchtune's chunked loss.

    loss = sum_i [logsumexp_v (h_i W^T)_v - (h_i W^T)_{y_i}]
    dL/dh_i = (softmax(h_i W^T) - onehot(y_i)) W,   dL/dW = sum_i (softmax(h_i W^T) - onehot(y_i))^T h_i
"""

from __future__ import annotations

import torch

__all__ = ["CHUNK_LOGITS", "linear_cross_entropy_sum"]

# rows per chunk: about 2^23 logits (32 MiB in fp32) at a time
CHUNK_LOGITS = 1 << 23


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total, grad_h, grad_w = _loss_and_grads(hidden, weight, targets, chunk, need_h, need_w)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_total.to(grad_h.dtype if grad_h is not None else grad_w.dtype)
        return (
            grad_h * scale if grad_h is not None else None,
            grad_w * scale if grad_w is not None else None,
            None,
            None,
        )


def _loss_and_grads(hidden, weight, targets, chunk: int, need_h: bool, need_w: bool):
    """Summed fp32 loss, and dL/dhidden [N, H] / dL/dweight [V, H] (None where not needed)."""
    compute = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    total = torch.zeros((), dtype=compute, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros_like(weight) if need_w else None
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start : start + chunk]
        y = targets[start : start + chunk]
        logits = (h @ weight.T).to(compute)  # [c, V]
        lse = torch.logsumexp(logits, dim=-1)
        total += (lse - logits.gather(1, y.unsqueeze(1)).squeeze(1)).sum()
        if need_h or need_w:
            probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
            probs[torch.arange(len(y), device=y.device), y] -= 1.0  # d loss / d logits
            g = probs.to(hidden.dtype)
            if need_h:
                grad_h[start : start + chunk] = g @ weight
            if need_w:
                grad_w += (g.T @ h).to(grad_w.dtype)
    return total, grad_h, grad_w


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_i CE(hidden[i] @ weight^T, targets[i]) as a scalar (fp32 at least), never holding all logits.

    Args:
        hidden: [N, H] final hidden states at the positions that have a target.
        weight: [V, H] the LM head (no bias).
        targets: [N] token ids (no ignore index: select the positions first).
    """
    chunk = max(16, CHUNK_LOGITS // weight.shape[0])
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        return _loss_and_grads(hidden, weight, targets, chunk, False, False)[0]
    return _ChunkedLinearCE.apply(hidden, weight, targets, chunk)
