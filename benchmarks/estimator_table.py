"""Measure peak memory of real training runs and compare with `deltatune estimate`.

    python benchmarks/estimator_table.py [--only NAME ...] [--steps 2]

Each config trains for a few steps in its own process (`deltatune train ... --force`); its
summary.json `peak_memory_bytes` (peak RSS on CPU) is compared with the estimator's prediction.
The table is written to tests/data/estimator_table.json (checked by tests/unit/test_estimate.py)
and printed as markdown for docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "tests" / "data" / "estimator_table.json"

SMOL = "smollm2-135m-instruct"
LORA16 = ["delta.r=16", "delta.alpha=32", "delta.dropout=0.05"]
# name -> (data spec, overrides); {data} is replaced by the generated data file
CONFIGS: dict[str, tuple[dict, list[str]]] = {
    "tiny-llama lora b4 s256": ({"n": 64, "mean_tokens": 175}, ["model=tiny-llama", "train.batch_size=4", "data.max_length=256", *LORA16]),
    "tiny-llama qlora-nf4 b8 s512 checkpointing": ({"n": 32, "mean_tokens": 600, "spread": 0.1}, ["model=tiny-llama", "train.batch_size=8", "data.max_length=512", "quantize=nf4", "train.gradient_checkpointing=true", *LORA16]),
    "lora b2 s128 padded": ({"n": 32, "mean_tokens": 175, "spread": 0.3}, [f"model={SMOL}", "train.batch_size=2", "data.max_length=128", *LORA16]),
    "lora b1 s512 packed": ({"n": 32, "mean_tokens": 175}, [f"model={SMOL}", "train.batch_size=1", "data.max_length=512", "data.packing=true", *LORA16]),
    "lora b2 s256 checkpointing": ({"n": 16, "mean_tokens": 400, "spread": 0.2}, [f"model={SMOL}", "train.batch_size=2", "data.max_length=256", "train.gradient_checkpointing=true", *LORA16]),
    "qlora-nf4 b1 s384": ({"n": 16, "mean_tokens": 600, "spread": 0.1}, [f"model={SMOL}", "train.batch_size=1", "data.max_length=384", "quantize=nf4", *LORA16]),
    "lora-int8 b1 s256": ({"n": 16, "mean_tokens": 400, "spread": 0.2}, [f"model={SMOL}", "train.batch_size=1", "data.max_length=256", "quantize=int8", *LORA16]),
    "lora r64 nodropout b1 s256": ({"n": 16, "mean_tokens": 400, "spread": 0.1}, [f"model={SMOL}", "train.batch_size=1", "data.max_length=256", "delta.r=64", "delta.alpha=64", "delta.dropout=0.0"]),
}


def overrides_for(name: str, data_path: Path, steps: int, out: Path) -> list[str]:
    _, overrides = CONFIGS[name]
    return [
        f"data.train={data_path}",
        f"train.max_steps={steps}",
        "train.warmup=0",
        f"output_dir={out}",
        "overwrite=true",
        *overrides,
    ]


def write_data(spec: dict, directory: Path) -> Path:
    from deltatune.perf.synthetic import write_synthetic_chats

    return write_synthetic_chats(directory / "train.jsonl", spec["n"], spec["mean_tokens"], seed=0, spread=spec.get("spread", 0.6))


def measure(name: str, steps: int) -> dict:
    from deltatune.config import load_config
    from deltatune.perf.estimate import estimate

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_data(CONFIGS[name][0], tmp)
        overrides = overrides_for(name, data, steps, tmp / "run")
        (tmp / "base.yaml").write_text("stage: sft\n")
        predicted = estimate(load_config(tmp / "base.yaml", overrides))
        started = time.time()
        subprocess.run(
            [sys.executable, "-m", "deltatune", "train", str(tmp / "base.yaml"), *overrides, "--force"],
            check=True, stdout=subprocess.DEVNULL, cwd=ROOT,
        )
        summary = json.loads((tmp / "run" / "summary.json").read_text())
    measured = summary["peak_memory_bytes"]
    return {
        "name": name,
        "data": CONFIGS[name][0],
        "overrides": CONFIGS[name][1],
        "steps": steps,
        "predicted_bytes": predicted.peak_memory_bytes,
        "measured_bytes": measured,
        "error": round(predicted.peak_memory_bytes / measured - 1, 4),
        "parts": {k: v for k, v in predicted.as_dict().items() if isinstance(v, int) and k != "world_size"},
        "batch": predicted.as_dict()["batch"],
        "wall_s": round(time.time() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--steps", type=int, default=1)
    args = parser.parse_args()
    from deltatune.perf.machine import cpu_description

    table = json.loads(TABLE.read_text()) if TABLE.is_file() else {"rows": []}
    rows = {r["name"]: r for r in table["rows"]}
    for name in args.only or list(CONFIGS):
        row = measure(name, args.steps)
        rows[name] = row
        print(json.dumps(row), flush=True)
        table = {"machine": cpu_description(), "rows": [rows[n] for n in CONFIGS if n in rows]}
        TABLE.write_text(json.dumps(table, indent=1) + "\n")
    print("| config | predicted | measured peak RSS | error |\n|---|---|---|---|")
    for r in table["rows"]:
        print(f"| {r['name']} | {r['predicted_bytes'] / 2**30:.2f} GB | {r['measured_bytes'] / 2**30:.2f} GB | {100 * r['error']:+.1f}% |")


if __name__ == "__main__":
    main()
