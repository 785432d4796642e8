"""Data parallelism for a model with deltas: DDP or FSDP2 over torchrun's process group.

`wrap(model, deltas, mode, device)` returns a `Parallel` the loop trains through:

- `ddp`: `DistributedDataParallel` keeps a full copy of the model on every rank and all-reduces
  the gradients of the trainable (delta) parameters during backward.
- `fsdp`: FSDP2 `fully_shard` shards every parameter (base and delta), its gradient and its
  optimizer state over the ranks, one unit per transformer block (the model's `_no_split_modules`)
  plus a root unit for the rest (embeddings, tied LM head, final norm).

Both wrap a small root module whose forward runs `fn(model, batch)`: loss functions may call
submodules directly (e.g. the backbone, then the LM head on the label positions only) instead of
`model.forward`, and the wrapper's hooks (DDP's reducer, FSDP's all-gather) must still run.

State leaves a `Parallel` in a world-size-independent form: full, unsharded tensors keyed by the
deltas' parameter names, and the optimizer's state dict with full tensors, i.e. exactly what a
single process has. A checkpoint written with N processes therefore loads with M.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, Literal

import torch
from torch import nn

from deltatune.deltas import DeltaSet
from deltatune.train import dist

__all__ = ["Parallel", "wrap", "call", "is_sharded", "delta_weights"]

Mode = Literal["single", "ddp", "fsdp"]


class _Root(nn.Module):
    """What DDP/FSDP wrap: `root(fn, *args)` runs `fn(model, *args)` inside the wrapper's forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


class Parallel:
    """A model prepared for training on this process group (see module docstring)."""

    def __init__(self, model: nn.Module, deltas: DeltaSet, mode: Mode, root: nn.Module | None) -> None:
        self.model, self.deltas, self.mode, self.root = model, deltas, mode, root
        self.names = [name for name, _ in deltas.named_parameters()]
        # The trainable parameters as the model holds them after wrapping: FSDP replaces them by
        # sharded DTensors, so they are looked up by name rather than taken from the deltas' lists.
        live = dict(model.named_parameters(remove_duplicate=False))
        self.params: list[tuple[str, nn.Parameter]] = [(name, live[name]) for name in self.names]

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(model, *args)`, through the wrapper's forward when there is one."""
        return fn(self.model, *args) if self.root is None else self.root(fn, *args)

    def sync_gradients(self, sync: bool):
        """Context for one micro-step's forward+backward: with `sync=False` the gradients only
        accumulate locally (no communication); the last micro-step of an optimizer step syncs."""
        if self.mode == "ddp" and not sync:
            return self.root.no_sync()
        if self.mode == "fsdp":
            self.root.set_requires_gradient_sync(sync)
        return nullcontext()

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the global gradient norm (over all ranks' shards) and return it before clipping."""
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.params], max_norm)
        return float(norm.full_tensor() if _is_dtensor(norm) else norm)

    # ---- world-size-independent state ----------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        """Full trainable weights by name (under FSDP every rank joins the gather; rank 0 keeps them, on CPU)."""
        if self.mode != "fsdp":
            return self.deltas.state_dict()
        out = {}
        for name, param in self.params:
            full = _full(param.detach())
            if dist.is_main():
                out[name] = full.cpu()
        return out

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        if self.mode != "fsdp":
            self.deltas.load_state_dict(weights)
            return
        missing = [name for name in self.names if name not in weights]
        if missing:
            raise KeyError(f"checkpoint weights lack {missing[:3]}")
        with torch.no_grad():
            for name, param in self.params:
                _copy_into(param, weights[name])

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state dict with full tensors (FSDP: gathered; rank 0 keeps it)."""
        state = optimizer.state_dict()
        if self.mode != "fsdp":
            return state
        full = {
            index: {key: _full(value).cpu() if _is_dtensor(value) else value for key, value in entry.items()}
            for index, entry in state["state"].items()
        }
        return {"state": full, "param_groups": state["param_groups"]} if dist.is_main() else {}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if self.mode == "fsdp":
            params = [p for group in optimizer.param_groups for p in group["params"]]
            sharded = {}
            for index, entry in state["state"].items():
                param = params[int(index)]
                sharded[index] = {
                    key: _shard_like(param, value) if torch.is_tensor(value) and value.shape == param.shape else value
                    for key, value in entry.items()
                }
            state = {"state": sharded, "param_groups": state["param_groups"]}
        optimizer.load_state_dict(state)


def _is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def _shard_like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's piece of `full`, laid out like `param` (a DTensor), or `full` itself."""
    if not _is_dtensor(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    # Every rank read the same file, so each slices its own piece without communicating.
    value = full.to(device=param.device, dtype=param.dtype)
    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)


def _copy_into(param: torch.Tensor, full: torch.Tensor) -> None:
    if full.shape != param.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(full.shape)}, the model's {tuple(param.shape)}")
    if _is_dtensor(param):
        param.to_local().copy_(_shard_like(param, full).to_local())
    else:
        param.copy_(full)


# ---- wrapping -------------------------------------------------------------------------------------
_WRAPPED: weakref.WeakKeyDictionary[nn.Module, Parallel] = weakref.WeakKeyDictionary()


def wrap(model: nn.Module, deltas: DeltaSet, mode: Literal["ddp", "fsdp"], device: torch.device) -> Parallel:
    """Prepare `model` (already on `device`) for data-parallel training; in one process, a no-op.

    Wrapping the same model again (a second `train()` call) reuses the FSDP sharding; DDP is
    rebuilt when the set of trainable parameters changed.
    """
    if not dist.is_distributed():
        return Parallel(model, deltas, "single", None)
    previous = _WRAPPED.get(model)
    names = [name for name, _ in deltas.named_parameters()]
    if previous is not None and previous.mode == "fsdp":
        wrapped = Parallel(model, deltas, "fsdp", previous.root)
    elif previous is not None and mode == "ddp" and previous.names == names:
        wrapped = previous
    elif mode == "fsdp":
        wrapped = Parallel(model, deltas, "fsdp", _fully_shard(model, device))
    else:
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (rotary tables) are the same on every rank: no need to broadcast them each forward.
        options = inspect.signature(DistributedDataParallel).parameters
        no_buffer_sync = {"forward_sync_buffers" if "forward_sync_buffers" in options else "broadcast_buffers": False}
        root = DistributedDataParallel(
            _Root(model),
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,  # gradients live in the communication buckets: no copy
            **no_buffer_sync,
        )
        wrapped = Parallel(model, deltas, "ddp", root)
    _WRAPPED[model] = wrapped
    return wrapped


def _fully_shard(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.world_size(),))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    # The root unit holds what is left, including tied input/output embeddings (one unit must own both).
    root = _Root(model)
    fully_shard(root, mesh=mesh)
    return root


def call(model: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(model, *args)` for evaluation or generation, through the FSDP root when the model is
    sharded (its forward hooks gather the parameters). DDP models are called directly: every rank
    holds the full model, and the DDP wrapper would expect a backward pass."""
    wrapped = _WRAPPED.get(model)
    if wrapped is not None and wrapped.mode == "fsdp":
        return wrapped.root(fn, *args)
    return fn(model, *args)


def is_sharded(model: nn.Module) -> bool:
    """Whether `model`'s parameters are FSDP shards (every rank must then run the same forwards)."""
    wrapped = _WRAPPED.get(model)
    return wrapped is not None and wrapped.mode == "fsdp"


def delta_weights(model: nn.Module, deltas: DeltaSet) -> dict[str, torch.Tensor]:
    """The deltas' full weights by name, for saving an adapter: gathered from the shards under FSDP
    (every rank must call this; rank 0 gets the tensors), else the deltas' own state dict."""
    wrapped = _WRAPPED.get(model)
    return wrapped.weights() if wrapped is not None and wrapped.mode == "fsdp" else deltas.state_dict()

