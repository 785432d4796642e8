"""Every method on the demo task: SmolLM2-135M-Instruct, the demo's data and step budget.

    python benchmarks/methods_table.py [--only lora ia3 ...] [--steps 40]

Each method runs `deltatune demo delta.method=METHOD ...` in its own process (so peak RSS is its
own), with the learning rate usual for that family (the demo's LoRA settings mean nothing to the
others). The numbers come from each run's summary.json: trainable parameters, final eval loss,
tokens/s, peak RSS and the demo's held-out scores. Results go to benchmarks/results/methods.json
and are printed as the markdown table of the README's "Choosing a method".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "methods.json"

# name -> overrides on top of the demo config (same data, steps, batch, schedule for all)
METHODS: dict[str, list[str]] = {
    "lora": [],  # the demo itself: r=8, alpha=16, all-linear, lr 2e-3
    "dora": ["delta.use_dora=true"],
    "ia3": ["delta.method=ia3", "train.lr=1e-2"],
    "bitfit": ["delta.method=bitfit", "train.lr=2e-3"],
    "adapter": ["delta.method=adapter", "train.lr=1e-3"],
    "prompt": ["delta.method=prompt", "train.lr=3e-2"],
    "prefix": ["delta.method=prefix", "train.lr=1e-3"],
    "ptuning": ["delta.method=ptuning", "train.lr=1e-3"],
    "ptuning2": ["delta.method=ptuning2", "train.lr=2e-3"],
    "diffprune": ["delta.method=diffprune", "train.lr=2e-3"],
    "freeze": ["delta.method=freeze", "delta.trainable_layers=4", "train.lr=1e-4"],
    "full": ["delta.method=full", "train.lr=5e-5"],
}


def run(name: str, steps: int) -> dict:
    out = ROOT / "runs" / "methods" / name
    overrides = [*METHODS[name], f"train.max_steps={steps}", "train.save_every=0"]
    started = time.time()
    subprocess.run(
        [sys.executable, "-m", "deltatune", "demo", *overrides, "--output-dir", str(out)],
        check=True, stdout=subprocess.DEVNULL, cwd=ROOT,
    )
    summary = json.loads((out / "summary.json").read_text())
    return {
        "method": name,
        "overrides": overrides,
        "trainable_params": summary["trainable_params"],
        "trainable_pct": 100 * summary["trainable_params"] / summary["total_params"],
        "final_eval_loss": summary["final_eval_loss"],
        "tokens_per_s": summary["tokens_per_s"],
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "format_score": summary["demo"]["tuned"]["format_score"],
        "answer_accuracy": summary["demo"]["tuned"]["answer_accuracy"],
        "base_format_score": summary["demo"]["base"]["format_score"],
        "wall_s": round(time.time() - started, 1),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| method | trainable | eval loss | tokens/s | peak RSS | JSON format | answer acc. |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['method']}` | {r['trainable_params']:,} ({r['trainable_pct']:.2f}%) | {r['final_eval_loss']:.3f} "
            f"| {r['tokens_per_s']:.0f} | {r['peak_memory_bytes'] / 1e9:.2f} GB | {r['format_score']:.0%} "
            f"| {r['answer_accuracy']:.0%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(METHODS), help="methods to (re)run; default: all")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    done = {r["method"]: r for r in json.loads(RESULTS.read_text())["rows"]} if RESULTS.exists() else {}
    for name in args.only or list(METHODS):
        print(f"=== {name} {time.strftime('%H:%M:%S')}", flush=True)
        try:
            done[name] = run(name, args.steps)
        except subprocess.CalledProcessError as error:
            print(f"{name} failed: {error}", flush=True)
            continue
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        rows = [done[m] for m in METHODS if m in done]
        RESULTS.write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=1) + "\n")
        print(json.dumps(done[name]), flush=True)
    print(markdown([done[m] for m in METHODS if m in done]))


if __name__ == "__main__":
    main()
