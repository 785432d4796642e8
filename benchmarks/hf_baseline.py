"""The usual stack, for `deltatune bench`: transformers + PEFT in a plain PyTorch loop.

Run by the benchmark in its own process (so its peak RSS is its own); it does not import
deltatune. It reads the pre-tokenized examples the benchmark wrote (input_ids + labels, the
same for both stacks), takes `batch` examples per step in file order, right-pads them to the
longest (dynamic padding, a multiple of 8, as DataCollatorForSeq2Seq does), and trains with
AdamW (lr 2e-4, constant, grad-norm clip 1.0) through `model(input_ids, attention_mask,
labels).loss` (transformers' mean over label tokens). LoRA: PEFT `LoraConfig(r, alpha, dropout,
target_modules=[q,k,v,o,gate,up,down])`; its initial adapter is saved so that deltatune starts
from the same weights. A plain loop rather than `Trainer`: PERFORMANCE.md measured the two
within 2% of each other here, and the loop makes the per-step timing unambiguous.

    python benchmarks/hf_baseline.py --model DIR --examples FILE --method lora --batch 8 \
        --steps 6 --warmup 1 --out result.json [--init-adapter DIR] [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peak_rss() -> int:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the launching process)."""
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def _allocator() -> str:
    """'tcmalloc' where the user preloaded it, else 'glibc' (the default of a Python process)."""
    return "tcmalloc" if "tcmalloc" in Path("/proc/self/maps").read_text() else "glibc"


def batches(path: Path, batch: int, steps: int, pad_id: int):
    examples = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for step in range(steps):
        chunk = [examples[(step * batch + i) % len(examples)] for i in range(batch)]
        length = -(-max(len(e["input_ids"]) for e in chunk) // 8) * 8
        ids = torch.full((batch, length), pad_id, dtype=torch.long)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        mask = torch.zeros((batch, length), dtype=torch.long)
        for b, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[b, :n] = torch.tensor(e["input_ids"])
            labels[b, :n] = torch.tensor(e["labels"])
            mask[b, :n] = 1
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--examples", required=True, type=Path)
    parser.add_argument("--method", choices=["lora", "full", "qlora"], default="lora")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--init-adapter", type=Path, default=None)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    notes = []
    if args.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        if args.method == "qlora":
            notes.append("no 4-bit base in the usual stack on this CPU (bitsandbytes is CUDA-first): PEFT LoRA over the fp32 base")
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"))
        if args.init_adapter:
            model.save_pretrained(args.init_adapter)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16" else nullcontext
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    model.train()
    records = []
    for step, batch in enumerate(batches(args.examples, args.batch, args.warmup + args.steps, pad_id)):
        started = time.perf_counter()
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        records.append({
            "step": step,
            "loss": float(loss.detach()),
            "seconds": seconds,
            "tokens": int(batch["attention_mask"].sum()),
            "padded_tokens": int(batch["input_ids"].numel()),
            "label_tokens": int((batch["labels"][:, 1:] != -100).sum()),
            "warmup": step < args.warmup,
        })
        print(json.dumps(records[-1]), flush=True)
    args.out.write_text(json.dumps({
        "stack": f"transformers + peft, plain torch loop, {args.precision}, padded batches, {_allocator()}",
        "records": records,
        "peak_rss_bytes": _peak_rss(),
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "notes": notes,
    }))


if __name__ == "__main__":
    main()
