"""Predict a run's peak memory and time per step before loading any weights.

The model is built from its config alone on *fake* tensors (torch's FakeTensorMode: shapes,
dtypes and storages, no data), the run's quantization and deltas are applied with the real code,
and one forward pass of the worst micro-batch is traced with `saved_tensors_hooks`, which see
every tensor autograd keeps for the backward pass. So the activation figure follows the model's
real code path (SDPA kernel, LoRA dropout masks, frozen vs trainable weights) for any
architecture transformers can build from a config, instead of a per-architecture formula.

Peak memory of one process (bytes):

    runtime + data + weights + optimizer
      + max( activations(B, T) + loss_head(N) + one block's gradients   # start of backward
             + grad of the LM head when it trains,
             gradients + optimizer-step temporaries )                    # end of backward / step

- runtime: interpreter, torch, transformers, tokenizer, logging (measured on CPU; 0 on CUDA,
  whose allocator peak is what `summary.json` reports there);
- data: the tokenized rows held as Python lists;
- weights: every parameter and buffer as stored (NF4/int8 codes for a quantized base);
- optimizer: AdamW's two fp32 moments per trainable parameter;
- activations: the traced saved tensors, scaled linearly to each micro-batch's rows x length;
  with `train.gradient_checkpointing` only each block's input is kept, plus one block recomputed
  in the backward pass;
- loss_head: for the chunked loss (objectives/linear_ce.py) the [N, hidden] gradient it keeps and
  one chunk of logits with its temporaries; otherwise logits, log-softmax and their gradients over
  the N label positions ([N, vocab]);
- under ddp every rank holds all of the above plus a bucket copy of the gradients; under fsdp
  weights, gradients and optimizer states are divided by the world size, plus one block gathered.

Time per step is the run's matmul FLOPs (forward, input gradients, weight gradients of trainable
layers, attention) divided by the machine's measured fp32/bf16 matmul peak times the fraction
deltatune reaches on a step (STEP_EFFICIENCY; see docs/performance.md).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from deltatune.config import RunConfig
from deltatune.errors import UserError
from deltatune.objectives.linear_ce import CHUNK_LOGITS

__all__ = [
    "BatchShape",
    "MemoryEstimate",
    "estimate",
    "compare_methods",
    "EstimateContext",
    "variant",
    "flops_rate",
    "model_config",
    "batch_shapes",
    "format_bytes",
    "RUNTIME_BYTES_CPU",
]

RUNTIME_BYTES_CPU = 430 * 2**20
"""Resident memory of a CPU training process before the model's weights and activations: Python,
torch, transformers, tokenizers, TensorBoard writer, allocator arenas (calibrated on this
project's reference machine; see docs/performance.md)."""

DATA_BYTES_PER_TOKEN = 80
"""Tokenized rows are Python lists of ints: 2 list slots (ids, labels) plus an int object."""

STEP_EFFICIENCY = 0.45
"""Fraction of the measured matmul peak that a deltatune fp32 training step reaches. An
assumption, not yet calibrated: on the shared build machine no uncontended step could be timed
(docs/performance.md); the time estimate is a rough guide, the memory estimate is the checked one."""


@dataclass(frozen=True)
class BatchShape:
    """One micro-batch: rows x padded length, with its label and real-token counts."""

    rows: int
    length: int
    label_tokens: int
    tokens: int


@dataclass
class MemoryEstimate:
    """Predicted peak memory (bytes) of one training process and its parts."""

    label: str
    peak_memory_bytes: int
    runtime: int
    data: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    loss_head: int
    transient: int
    trainable_params: int
    total_params: int
    batch: BatchShape
    world_size: int = 1
    strategy: str = "single"
    flops_per_step: float = 0.0
    tokens_per_step: int = 0
    time_per_step_s: float | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["batch"] = asdict(self.batch)
        return out

    def breakdown(self) -> str:
        parts = [
            ("runtime", self.runtime),
            ("data", self.data),
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer", self.optimizer),
            ("activations", self.activations),
            ("loss head", self.loss_head),
            ("backward temporaries", self.transient),
        ]
        return ", ".join(f"{name} {format_bytes(b)}" for name, b in parts if b)


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


# ---- model config without weights -------------------------------------------------------------
def model_config(spec: str):
    """The transformers config of `spec` without loading weights: a converted GGUF's cached
    config.json, else the GGUF header; a local directory's config.json; a tiny model's recipe."""
    from pathlib import Path

    from transformers import AutoConfig

    from deltatune.models.aliases import ALIASES, PackagedModel, RandomModel, packaged_path
    from deltatune.models.load import _gguf_cache_dir, load_tokenizer, resolve_model_source

    entry = ALIASES.get(spec)
    if isinstance(entry, RandomModel):
        tokenizer = load_tokenizer(entry.tokenizer_from)
        special = {k: getattr(tokenizer, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
        return AutoConfig.for_model(entry.family, vocab_size=len(tokenizer), **{**special, **entry.config})
    path = packaged_path(spec) if isinstance(entry, PackagedModel) else Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model file not found: {path}")
        cached = _gguf_cache_dir(path, spec if entry else path.stem)
        if (cached / "config.json").is_file():
            return AutoConfig.from_pretrained(cached)
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if path.is_dir():
        return AutoConfig.from_pretrained(path)
    source = resolve_model_source(spec)  # a clear error for a spec that is no alias, file or hub id
    try:
        return AutoConfig.from_pretrained(source)  # a hub id (online)
    except OSError as error:
        raise UserError(f"cannot read the config of model '{spec}': {str(error).splitlines()[0]}") from None


# ---- the micro-batches of the run -------------------------------------------------------------
def batch_shapes(cfg: RunConfig, rows, pad_id: int = 0, world_size: int = 1, limit: int = 20_000) -> list[BatchShape]:
    """Shapes of the micro-batches rank 0 will see over the run, from the tokenized training
    rows (the loader's own deterministic order). Without rows: `batch_size` x `max_length`."""
    from deltatune.data.loader import BatchStream
    from deltatune.train.loop import total_steps

    b, t = cfg.train.batch_size, cfg.data.max_length
    if not rows:
        return [BatchShape(b, t, b * (t - 1), b * t)]
    stream = BatchStream(rows, b, pad_id, seed=cfg.train.seed, world_size=world_size)
    micro = min(limit, total_steps(cfg.train, stream.batches_per_epoch) * cfg.train.grad_accum)
    shapes = []
    for i in range(micro):
        epoch, index = divmod(i, max(stream.batches_per_epoch, 1))
        order = stream._order(epoch)
        start = index * world_size * stream.batch_size
        batch = [rows[j] for j in order[start : start + stream.batch_size]]
        length = -(-max(len(r.input_ids) for r in batch) // 8) * 8
        shapes.append(
            BatchShape(len(batch), length, sum(r.num_label_tokens for r in batch), sum(len(r.input_ids) for r in batch))
        )
    return shapes


# ---- the fake-tensor trace --------------------------------------------------------------------
@dataclass
class _Trace:
    weights: int
    trainable: int
    total_params: int
    outside: int
    per_layer: list[int]
    layer_input: int
    traced_tokens: int
    largest_trainable: int
    lm_head_trains: bool
    chunked_head: bool
    vocab: int
    hidden: int
    forward_macs_per_token: int
    trainable_macs_per_token: int
    attention_per_token_per_ctx: int
    largest_block_params: int
    quantized_numel: int = 0


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (the largest ModuleList)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _make_trainable_full(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def _depth_key(config) -> str | None:
    return next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(config, k)), None)


def _shallow(config, cfg: RunConfig) -> tuple[Any, int, int]:
    """A copy of `config` with at most 2 blocks, (its depth, the real depth). Blocks after the
    first are identical (the first differs: its input needs no gradient), so the trace of 2
    extrapolates; deltas that pick blocks by index (`layers`, a regex) get the full depth."""
    key = _depth_key(config)
    depth = getattr(config, key) if key else 0
    by_index = any(getattr(d, "layers", None) is not None for d in cfg.delta) or any(
        isinstance(getattr(d, "target", None), str) and d.target != "all-linear" for d in cfg.delta
    )
    if not key or depth <= 2 or by_index:
        return config, depth, depth
    shallow = copy.deepcopy(config)
    setattr(shallow, key, 2)
    if getattr(shallow, "layer_types", None):
        shallow.layer_types = shallow.layer_types[:2]
    return shallow, 2, depth


def _trace(config, cfg: RunConfig, method: str, quantize: str, shape: BatchShape, device: torch.device) -> _Trace:
    """Trace a forward pass of a fake model (see the module docstring); block-level figures of
    a shallow trace are extrapolated to the real depth."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from deltatune.deltas import attach
    from deltatune.deltas.registry import METHODS
    from deltatune.models.load import TASKS
    from deltatune.models.quantize import QuantizedLinear, quantize_model
    from deltatune.objectives.clm import plain_head
    from deltatune.train.loop import autocast_for

    config, traced_depth, depth = _shallow(config, cfg)
    extra = depth - traced_depth
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device(device):
        model = TASKS["causal-lm"].from_config(config, attn_implementation="sdpa")
        quantize_model(model, quantize)
        if method == "full" and "full" not in METHODS:
            _make_trainable_full(model)
        elif method == "full":
            attach(model, [METHODS["full"].config_class()])
        else:
            attach(model, cfg.delta)
        model.train()
        params = list(model.parameters())
        stored = {_storage_key(t): t.untyped_storage().nbytes() for t in [*params, *model.buffers()]}
        trainable = [p for p in params if p.requires_grad]
        blocks = _blocks(model)
        current: list[int | None] = [None]
        hooks = []
        for i, block in enumerate(blocks):
            hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)))
            hooks.append(block.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))
        seen: dict[int, tuple[int, int | None]] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = _storage_key(t)
            if key not in stored and key not in seen:
                seen[key] = (t.untyped_storage().nbytes(), current[0])
            return t

        ids = torch.zeros(shape.rows, shape.length, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast_for(cfg.train, device):
            model.base_model(input_ids=ids, use_cache=False)
        for h in hooks:
            h.remove()

        per_layer = [0] * len(blocks)
        outside = 0
        for nbytes, layer in seen.values():
            if layer is None:
                outside += nbytes
            else:
                per_layer[layer] += nbytes
        head = model.get_output_embeddings()
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
        macs = sum(m.in_features * m.out_features for _, m in linears)
        trainable_macs = sum(
            m.in_features * m.out_features
            for _, m in linears
            if not isinstance(m, QuantizedLinear) and m.weight.requires_grad
        )
        block_params = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
        last = blocks[-1] if blocks else nn.Module()
        last_stored = {_storage_key(t): t.untyped_storage().nbytes() for t in [*last.parameters(), *last.buffers()]}
        last_linears = [m for m in last.modules() if isinstance(m, nn.Linear)]
        quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        last_quantized = [m for m in last.modules() if isinstance(m, QuantizedLinear)]
        return _Trace(
            weights=sum(stored.values()) + extra * sum(last_stored.values()),
            trainable=sum(p.numel() for p in trainable) + extra * sum(p.numel() for p in last.parameters() if p.requires_grad),
            total_params=sum(p.numel() for p in params) + extra * sum(p.numel() for p in last.parameters()),
            outside=outside,
            per_layer=per_layer + per_layer[-1:] * extra,
            layer_input=config.hidden_size * 4 * shape.rows * shape.length,
            traced_tokens=shape.rows * shape.length,
            largest_trainable=max((p.numel() for p in trainable), default=0),
            lm_head_trains=head is not None and head.weight.requires_grad,
            chunked_head=plain_head(head),
            vocab=config.vocab_size,
            hidden=config.hidden_size,
            forward_macs_per_token=macs + extra * sum(m.in_features * m.out_features for m in last_linears),
            trainable_macs_per_token=trainable_macs + extra * sum(
                m.in_features * m.out_features
                for m in last_linears
                if not isinstance(m, QuantizedLinear) and m.weight.requires_grad
            ),
            attention_per_token_per_ctx=2 * config.num_attention_heads * getattr(
                config, "head_dim", config.hidden_size // config.num_attention_heads
            ) * depth,
            largest_block_params=block_params,
            quantized_numel=sum(m.in_features * m.out_features for m in quantized)
            + extra * sum(m.in_features * m.out_features for m in last_quantized),
        )


# ---- putting it together ----------------------------------------------------------------------
def _peak_for(tr: _Trace, cfg: RunConfig, shape: BatchShape, ckpt: bool) -> tuple[int, int, int]:
    """(activations, loss_head, transient) bytes of one micro-batch."""
    scale = shape.rows * shape.length / max(tr.traced_tokens, 1)
    block = max(tr.per_layer, default=0)
    # checkpointing keeps each block's input and recomputes one block at a time in backward
    kept = len(tr.per_layer) * tr.layer_input + block if ckpt else sum(tr.per_layer)
    activations = int((tr.outside + kept) * scale)
    bf16 = cfg.train.precision == "bf16"
    if tr.chunked_head:
        chunk_rows = min(shape.label_tokens, max(16, CHUNK_LOGITS // tr.vocab))
        loss_head = shape.label_tokens * tr.hidden * 4 * 2 + chunk_rows * tr.vocab * (10 if bf16 else 8)
    else:
        loss_head = shape.label_tokens * tr.vocab * (14 if bf16 else 12)
    transient = int(max(tr.per_layer, default=0) * scale)
    return activations, loss_head, transient


def _flops(tr: _Trace, shape: BatchShape, packed: bool) -> float:
    """Matmul FLOPs of one micro-batch: forward, input gradients, weight gradients of trainable
    layers, the LM head at label positions, and causal attention over the average context."""
    tokens = shape.rows * shape.length
    linear = 2 * tr.forward_macs_per_token * tokens * 2 + 2 * tr.trainable_macs_per_token * tokens
    head = 2 * tr.hidden * tr.vocab * shape.label_tokens * (3 if tr.lm_head_trains else 2)
    context = (shape.tokens / max(shape.rows, 1)) / 2 if not packed else shape.length / 16
    attention = 2 * tr.attention_per_token_per_ctx * context * tokens * 3
    return linear + head + attention


def _assemble(
    label: str,
    tr: _Trace,
    cfg: RunConfig,
    shapes: Sequence[BatchShape],
    data_tokens: int,
    world_size: int,
    strategy: str,
    device: torch.device,
    ckpt: bool,
) -> MemoryEstimate:
    runtime = RUNTIME_BYTES_CPU if device.type == "cpu" else 0
    data = data_tokens * DATA_BYTES_PER_TOKEN if device.type == "cpu" else 0
    weights, grads, optim = tr.weights, tr.trainable * 4, tr.trainable * 8
    notes = []
    if world_size > 1 and strategy == "fsdp":
        gathered = tr.largest_block_params * 4 * 2  # one block all-gathered, the next prefetched
        weights, grads, optim = weights // world_size + gathered, grads // world_size, optim // world_size
        notes.append(f"fsdp over {world_size} ranks: weights, gradients and optimizer states sharded")
    elif world_size > 1:
        grads *= 2  # DDP's communication buckets hold a second copy of the gradients
        notes.append(f"ddp over {world_size} ranks: every rank holds the whole model and a gradient bucket copy")
    step_tmp = tr.largest_trainable * 4 * 2
    best = None
    for shape in {(s.rows, s.length, s.label_tokens): s for s in shapes}.values():
        activations, loss_head, transient = _peak_for(tr, cfg, shape, ckpt)
        head_grad = tr.vocab * tr.hidden * 4 if tr.lm_head_trains else 0
        backward_start = activations + loss_head + transient + head_grad
        step_end = grads + step_tmp
        total = runtime + data + weights + optim + max(backward_start, step_end)
        if best is None or total > best[0]:
            best = (total, shape, activations, loss_head, transient)
    assert best is not None
    total, shape, activations, loss_head, transient = best
    if tr.quantized_numel and device.type == "cpu":
        # loading: the checkpoint's full-precision pages are read while quantizing (models/quantize.py)
        loading = runtime + data + weights + tr.quantized_numel * 4
        if loading > total:
            total = loading
            notes.append("the peak is while loading and quantizing the checkpoint")
    accum = cfg.train.grad_accum
    flops = sum(_flops(tr, s, cfg.data.packing) for s in shapes) / len(shapes) * accum
    tokens = int(sum(s.tokens for s in shapes) / len(shapes) * accum)
    return MemoryEstimate(
        label=label,
        peak_memory_bytes=int(total),
        runtime=runtime,
        data=data,
        weights=weights,
        gradients=grads,
        optimizer=optim,
        activations=activations,
        loss_head=loss_head,
        transient=transient,
        trainable_params=tr.trainable,
        total_params=tr.total_params,
        batch=shape,
        world_size=world_size,
        strategy=strategy if world_size > 1 else "single",
        flops_per_step=flops,
        tokens_per_step=tokens,
        notes=notes,
    )


ESTIMATED_STAGES = ("sft", "pt")
"""Stages the estimator models: a causal LM with next-token loss (the other stages' heads, pair
batches and rollouts are not traced yet; `deltatune train` skips the check for them)."""


class EstimateContext:
    """What every variant of one run shares (model config, tokenized rows, device), with traces
    cached per (method, quantization, delta configs): estimates of batch sizes and
    checkpointing variants cost no new trace."""

    def __init__(self, cfg: RunConfig, world_size: int = 1) -> None:
        from deltatune.models import load_tokenizer
        from deltatune.train.loop import resolve_device

        if cfg.stage not in ESTIMATED_STAGES:
            raise UserError(
                f"the memory estimate models the stages {', '.join(ESTIMATED_STAGES)} only; "
                f"stage {cfg.stage} is not modelled yet (deltatune train runs it without the check)"
            )
        self.cfg = cfg
        self.world_size = world_size
        self.strategy = getattr(cfg.train, "distributed", "ddp")
        self.device = resolve_device(cfg.train.device)
        self.config = model_config(cfg.model)
        tokenizer = load_tokenizer(cfg.model)
        self.pad_id = tokenizer.pad_token_id or 0
        self.rows = []
        if cfg.stage == "sft" and cfg.data.train:
            from deltatune.data import build_sft_data

            self.rows, _, _ = build_sft_data(cfg.data, tokenizer, cfg.train.seed)
        self.data_tokens = sum(len(r.input_ids) for r in self.rows)
        self._traces: dict[str, _Trace] = {}
        self._reference = max(self.shapes(cfg), key=lambda s: (s.rows * s.length, s.label_tokens))

    def shapes(self, cfg: RunConfig) -> list[BatchShape]:
        return batch_shapes(cfg, self.rows, self.pad_id, self.world_size)

    def trace(self, cfg: RunConfig, method: str) -> _Trace:
        key = f"{method}|{cfg.quantize}|{[d.model_dump_json() for d in cfg.delta]}|{cfg.train.precision}"
        if key not in self._traces:
            self._traces[key] = _trace(self.config, cfg, method, cfg.quantize, self._reference, self.device)
        return self._traces[key]

    def estimate(self, cfg: RunConfig, label: str | None = None, method: str = "delta") -> MemoryEstimate:
        """The estimate of `cfg` (a variant of the context's run: same model and data)."""
        if label is None:
            names = "+".join(d.method for d in cfg.delta)
            label = f"q{names}" if cfg.quantize == "nf4" and names == "lora" else names
            label += f" ({cfg.quantize} base)" if cfg.quantize == "int8" else ""
        return _assemble(
            label,
            self.trace(cfg, method),
            cfg,
            self.shapes(cfg),
            self.data_tokens,
            self.world_size,
            self.strategy,
            self.device,
            cfg.train.gradient_checkpointing,
        )


def estimate(cfg: RunConfig, world_size: int = 1, step_flops_per_s: float | None = None) -> MemoryEstimate:
    """Predicted peak memory and time per step of the run `cfg` describes (per rank)."""
    result = EstimateContext(cfg, world_size).estimate(cfg)
    if step_flops_per_s:
        result.time_per_step_s = result.flops_per_step / step_flops_per_s
    return result


def variant(cfg: RunConfig, **changes: Any) -> RunConfig:
    """`cfg` with top-level fields and `train.*` fields changed (`train__batch_size=2`)."""
    train = {k.removeprefix("train__"): v for k, v in changes.items() if k.startswith("train__")}
    top = {k: v for k, v in changes.items() if not k.startswith("train__")}
    return cfg.model_copy(update={**top, "train": cfg.train.model_copy(update=train)})


def compare_methods(
    cfg: RunConfig, world_size: int = 1, step_flops_per_s: float | None = None, ctx: EstimateContext | None = None
) -> list[MemoryEstimate]:
    """The same run as full fine-tuning, LoRA and QLoRA (NF4 base), without and with gradient
    checkpointing: "full needs X; lora Y; qlora Z"."""
    from deltatune.deltas.lora import LoraConfig

    ctx = ctx or EstimateContext(cfg, world_size)
    lora = next((d for d in cfg.delta if d.method == "lora"), None) or LoraConfig(r=16, alpha=32)
    out = []
    for label, method, changes in (
        ("full", "full", {"quantize": "none"}),
        ("lora", "delta", {"quantize": "none", "delta": [lora]}),
        ("qlora", "delta", {"quantize": "nf4", "delta": [lora]}),
    ):
        for ckpt in (False, True):
            run = variant(cfg, **changes, train__gradient_checkpointing=ckpt)
            est = ctx.estimate(run, label + (" +checkpointing" if ckpt else ""), method)
            if step_flops_per_s:
                est.time_per_step_s = est.flops_per_step * (4 / 3 if ckpt else 1) / step_flops_per_s
            out.append(est)
    return out


def flops_rate(cfg: RunConfig) -> float:
    """FLOP/s a deltatune step reaches here: measured matmul peak x STEP_EFFICIENCY."""
    from deltatune.perf.machine import matmul_peak_flops

    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    return matmul_peak_flops(dtype, seconds=0.5) * STEP_EFFICIENCY
