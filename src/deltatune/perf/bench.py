"""`deltatune bench`: deltatune against the usual stack (transformers + PEFT), head to head.

One run: the same synthetic chat examples (tokenized once, with the same label masks), the same
examples per optimizer step, the same hyper-parameters (LoRA r=16 alpha=32 dropout 0.05 on
q,k,v,o,gate,up,down; AdamW lr 2e-4 constant, no weight decay, grad-norm clip 1.0) and, for LoRA,
the same initial adapter (the baseline saves PEFT's initialisation, deltatune loads it). Each
stack trains in its own process (honest peak RSS), alternately. The usual stack pads each
step's examples to the longest; deltatune packs the same examples (each at most `seq` tokens)
into one padding-free row, as `deltatune train` does with `data.packing` (documents attend only
to themselves).

Printed: one JSON line with `speedup` (deltatune non-pad tokens/s over the baseline's),
`memory_ratio` (deltatune peak RSS over the baseline's), `loss_delta` (relative difference of
the final step's loss, over the same tokens), `mfu` (model FLOPs utilisation against the fp32
matmul peak measured in the same run) and the raw figures of both stacks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from deltatune.errors import UserError

__all__ = ["run_bench", "baseline_script"]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def baseline_script() -> Path:
    """benchmarks/hf_baseline.py of the source checkout (it imports peft, so it is not part of
    the installed package)."""
    here = Path(__file__).resolve()
    for root in (here.parents[3], Path.cwd()):
        script = root / "benchmarks" / "hf_baseline.py"
        if script.is_file():
            return script
    raise UserError("deltatune bench --against hf needs benchmarks/hf_baseline.py from the source checkout; run it there")


# ---- data shared by both stacks -------------------------------------------------------------
def write_examples(path: Path, model: str, n: int, mean_tokens: int, seq: int, seed: int = 0) -> dict[str, float]:
    """Tokenize `n` synthetic chats (chat template, assistant-only labels, truncated to `seq`)
    into JSON lines of {input_ids, labels}; returns length statistics."""
    from deltatune.data.tokenize import tokenize_conversation
    from deltatune.models import load_tokenizer
    from deltatune.perf.synthetic import synthetic_chats

    tokenizer = load_tokenizer(model)
    lengths = []
    with path.open("w") as f:
        for i, row in enumerate(synthetic_chats(n, mean_tokens, seed)):
            tok = tokenize_conversation(tokenizer, row["messages"], seq, False, f"synthetic:{i + 1}")
            lengths.append(len(tok.input_ids))
            f.write(json.dumps({"input_ids": tok.input_ids, "labels": tok.labels}) + "\n")
    return {"examples": n, "mean_tokens": statistics.mean(lengths), "max_tokens": max(lengths)}


# ---- the deltatune worker -------------------------------------------------------------------
class _StepStream:
    """The loop's stream protocol over a fixed list of batches (one per step)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches, self.index, self.epoch = batches, 0, 0
        self.batches_per_epoch = len(batches)

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self.batches[self.index % len(self.batches)]
        self.index += 1
        return batch

    def shard(self, rank: int, world_size: int) -> None:
        """One process only: the benchmark's steps are not sharded."""

    def state_dict(self) -> dict[str, int]:
        return {"epoch": 0, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.index = state["index"]


class _AllParameters:
    """Full fine-tuning as the loop sees a delta set, where no `full` method is registered."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        for p in model.parameters():
            p.requires_grad_(True)

    def named_parameters(self):
        return self.model.named_parameters()

    def state_dict(self):
        return {n: p.detach() for n, p in self.model.named_parameters()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state, strict=False)


def _step_batches(examples: Path, batch: int, steps: int, seq: int, pad_id: int, packing: bool) -> list[dict]:
    from deltatune.data.collate import Row, collate, pack
    from deltatune.data.tokenize import Tokenized

    rows = [json.loads(line) for line in examples.read_text().splitlines() if line.strip()]
    out = []
    for step in range(steps):
        chunk = [rows[(step * batch + i) % len(rows)] for i in range(batch)]
        toks = [Tokenized(r["input_ids"], r["labels"], "", False) for r in chunk]
        step_rows = pack(toks, seq) if packing else [Row(t.input_ids, t.labels) for t in toks]
        out.append(collate(step_rows, pad_id, single_row=packing))
    return out


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Train deltatune on the benchmark's steps; return per-step records and peak RSS."""
    from deltatune.config import TrainConfig
    from deltatune.deltas import LoraConfig, attach
    from deltatune.deltas.registry import METHODS
    from deltatune.export.peft_format import load_deltas
    from deltatune.models import load_model
    from deltatune.objectives.clm import count_label_tokens, lm_loss
    from deltatune.train.allocator import allocator_in_use
    from deltatune.train.loop import train
    from deltatune.train.summary import peak_memory_bytes

    torch.manual_seed(args.seed)
    quantize = "nf4" if args.method == "qlora" else "none"
    model, tokenizer = load_model(args.model, quantize=quantize)
    if args.method == "full":
        deltas = attach(model, METHODS["full"].config_class()) if "full" in METHODS else _AllParameters(model)
    elif args.init_adapter and Path(args.init_adapter, "adapter_config.json").is_file():
        deltas = load_deltas(model, args.init_adapter)
    else:
        deltas = attach(model, LoraConfig(r=16, alpha=32, dropout=0.05, target=TARGETS))
    batches = _step_batches(Path(args.examples), args.batch, args.warmup + args.steps, args.seq, tokenizer.pad_token_id, True)
    cfg = TrainConfig(
        max_steps=len(batches), lr=2e-4, schedule="constant", warmup=0, max_grad_norm=1.0, seed=args.seed,
        precision="fp32", gradient_checkpointing=args.gradient_checkpointing,
    )
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(model, deltas, _StepStream(batches), lm_loss, lambda b: count_label_tokens(b["labels"]),
                       cfg, Path(run_dir), log=lambda _: None)
    records = []
    for step, (entry, batch) in enumerate(zip(result.history, batches, strict=True)):
        tokens = int(batch["token_mask"].sum()) if "token_mask" in batch else int(batch["attention_mask"].sum())
        records.append({
            "step": step,
            "loss": entry["loss"],
            "seconds": tokens / entry["tokens_per_s"],
            "tokens": tokens,
            "padded_tokens": int(batch["input_ids"].numel()),
            "label_tokens": count_label_tokens(batch["labels"]),
            "warmup": step < args.warmup,
        })
    trainable = sum(p.numel() for _, p in deltas.named_parameters())
    return {
        "stack": f"deltatune (one padding-free packed row, chunked loss at label positions), fp32, {allocator_in_use()}",
        "records": records,
        "peak_rss_bytes": peak_memory_bytes(),
        "trainable_params": trainable,
        "total_params": sum(p.numel() for p in model.parameters()),
        "notes": [],
    }


# ---- the orchestrator -----------------------------------------------------------------------
def _summarise(result: dict[str, Any]) -> dict[str, Any]:
    timed = [r for r in result["records"] if not r["warmup"]]
    seconds = sum(r["seconds"] for r in timed)
    return {
        "tokens_per_s": sum(r["tokens"] for r in timed) / seconds,
        "tokens_per_s_all": sum(r["padded_tokens"] for r in timed) / seconds,
        "s_per_step": statistics.median(r["seconds"] for r in timed),
        "peak_rss_bytes": result["peak_rss_bytes"],
        "final_loss": timed[-1]["loss"],
        "losses": [round(r["loss"], 4) for r in result["records"]],
        "trainable_params": result["trainable_params"],
        "stack": result["stack"],
        "notes": result["notes"],
    }


def _child(command: list[str], out: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    env = {**(env or os.environ), "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise UserError(f"benchmark process failed ({' '.join(command[:3])} ...):\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def run_bench(
    method: str = "lora",
    seq: int = 512,
    steps: int = 6,
    batch: int = 8,
    warmup: int = 1,
    against: str = "hf",
    model: str = "smollm2-135m-instruct",
    mean_tokens: int = 175,
    repeats: int = 1,
    gradient_checkpointing: bool = False,
) -> dict[str, Any]:
    """Run both stacks alternately and return the result line (see module doc)."""
    from deltatune.models.load import resolve_model_source
    from deltatune.perf.machine import cpu_description, matmul_peak_flops
    from deltatune.train.allocator import preload_env, without_preload
    from deltatune.train.loop import cpu_has_native_bf16

    if against != "hf":
        raise UserError(f"--against {against!r}: only 'hf' (transformers + peft) is implemented")
    script = baseline_script()
    model_dir = str(resolve_model_source(model))
    with tempfile.TemporaryDirectory(prefix="deltatune-bench-") as tmp:
        tmp = Path(tmp)
        data = write_examples(tmp / "examples.jsonl", model, batch * (warmup + steps), mean_tokens, seq)
        peak_fp32 = matmul_peak_flops(torch.float32, seconds=2.0)
        # bf16 is only the baseline's best setting where the CPU multiplies bf16 natively
        peak_bf16 = matmul_peak_flops(torch.bfloat16, seconds=0.5, shape=(512, 512, 512))
        common = ["--examples", str(tmp / "examples.jsonl"), "--method", method, "--batch", str(batch),
                  "--steps", str(steps), "--warmup", str(warmup), "--init-adapter", str(tmp / "init")]
        ckpt = ["--gradient-checkpointing"] if gradient_checkpointing else []
        runs: dict[str, list[dict]] = {"baseline": [], "deltatune": []}
        for _ in range(repeats):
            out = tmp / "baseline.json"
            runs["baseline"].append(_child(
                [sys.executable, str(script), "--model", model_dir, *common, *ckpt, "--out", str(out)], out, without_preload(dict(os.environ))
            ))
            out = tmp / "deltatune.json"
            # deltatune runs as its command does (tcmalloc preloaded where installed), the usual
            # stack with the user's allocator (glibc's unless they preloaded another)
            runs["deltatune"].append(_child(
                [sys.executable, "-m", "deltatune.perf.bench", "--model", model, "--seq", str(seq), *common, *ckpt, "--out", str(out)],
                out, preload_env(dict(os.environ)) or dict(os.environ),
            ))
    base = max((_summarise(r) for r in runs["baseline"]), key=lambda s: s["tokens_per_s"])
    ours = max((_summarise(r) for r in runs["deltatune"]), key=lambda s: s["tokens_per_s"])
    total = runs["baseline"][0]["total_params"]
    flops_per_token = (6 if method == "full" else 4) * total
    return {
        "method": method,
        "seq": seq,
        "batch": batch,
        "steps": steps,
        "speedup": round(ours["tokens_per_s"] / base["tokens_per_s"], 3),
        "memory_ratio": round(ours["peak_rss_bytes"] / base["peak_rss_bytes"], 3),
        "loss_delta": round(abs(ours["final_loss"] - base["final_loss"]) / base["final_loss"], 4),
        "mfu": round(ours["tokens_per_s"] * flops_per_token / peak_fp32, 4),
        "mfu_baseline": round(base["tokens_per_s"] * flops_per_token / peak_fp32, 4),
        "matmul_peak_gflops": {"fp32": round(peak_fp32 / 1e9, 1), "bf16": round(peak_bf16 / 1e9, 1)},
        "flops_per_token": flops_per_token,
        "baseline_best_setting": "fp32" if not cpu_has_native_bf16() or peak_bf16 < peak_fp32 else "bf16 (not run: add --precision)",
        "deltatune": ours,
        "baseline": base,
        "data": data,
        "machine": cpu_description(),
        "load_average": os.getloadavg()[0],
    }


def _worker_main() -> None:
    parser = argparse.ArgumentParser(description="deltatune side of `deltatune bench` (run by it)")
    for name, kind, default in (("--model", str, None), ("--examples", str, None), ("--method", str, "lora"),
                                ("--batch", int, 8), ("--steps", int, 6), ("--warmup", int, 1), ("--seq", int, 512),
                                ("--init-adapter", str, None), ("--out", str, None), ("--seed", int, 0)):
        parser.add_argument(name, type=kind, default=default)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    Path(args.out).write_text(json.dumps(run_worker(args)))


if __name__ == "__main__":
    _worker_main()
