"""`deltatune demo`: teach SmolLM2-135M-Instruct a behaviour it lacks, and show it.

The model is fine-tuned with LoRA to answer every question as `{"answer": ..., "category": ...}`
(demo/dataset.py). Base and tuned model are scored on held-out prompts (entities and phrasings
not in the training data); the base model is the same model with the adapter disabled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltatune.data.readers import read_records
from deltatune.demo.dataset import score_reply

__all__ = ["DEMO_CONFIG", "DATA_DIR", "demo_config", "score", "run_demo"]

DATA_DIR = Path(__file__).parent / "data"

DEMO_CONFIG: dict[str, Any] = {
    "model": "smollm2-135m-instruct",
    "stage": "sft",
    "data": {"format": "messages", "max_length": 512, "packing": True},
    "delta": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target": "all-linear"},
    "train": {
        "max_steps": 40,
        "batch_size": 2,
        "lr": 2e-3,
        "schedule": "cosine",
        "warmup": 0.1,
        "eval_every": 20,
        "save_every": 20,
        "seed": 0,
    },
    "overwrite": True,
}
"""The demo's config (the data paths are filled in from the installed package)."""


def demo_config(output_dir: str = "runs/demo", overrides: list[str] | None = None):
    """The demo's RunConfig; `overrides` (key=value) change it, e.g. `delta.method=ia3`. Another
    method starts from its own defaults (the demo's LoRA settings mean nothing to it)."""
    from deltatune.config import load_config, parse_overrides

    overrides = list(overrides or [])
    base = DEMO_CONFIG
    method = parse_overrides([o for o in overrides if o.startswith("delta.method=")]).get("delta", {}).get("method")
    if method and method != DEMO_CONFIG["delta"]["method"]:
        base = {**DEMO_CONFIG, "delta": {"method": method}}
    paths = [f"output_dir={output_dir}", f"data.train={DATA_DIR / 'train.jsonl'}", f"data.eval={DATA_DIR / 'eval.jsonl'}"]
    return load_config(None, paths + overrides, base=base)


def score(model, tokenizer, prompts: list[dict[str, str]], max_new_tokens: int = 40) -> dict[str, Any]:
    """Greedy replies to the held-out prompts, with the format and answer scores."""
    from deltatune.inference import generate

    replies = generate(model, tokenizer, [p["prompt"] for p in prompts], max_new_tokens=max_new_tokens)
    marks = [score_reply(r, p["category"], p["answer"]) for r, p in zip(replies, prompts, strict=True)]
    return {
        "format_score": sum(m["format"] for m in marks) / len(marks),
        "answer_accuracy": sum(m["answer"] for m in marks) / len(marks),
        "replies": replies,
    }


def run_demo(output_dir: str = "runs/demo", overrides: list[str] | None = None, log=print) -> dict[str, Any]:
    """Train, then score base vs tuned on held-out prompts; results go to OUTPUT_DIR/summary.json."""
    from deltatune.inference import load_for_inference
    from deltatune.recipes import run_stage
    from deltatune.train.summary import update_summary

    cfg = demo_config(output_dir, overrides)
    prompts = [r.fields for r in read_records(DATA_DIR / "heldout.jsonl")]
    log(
        "deltatune demo: teaching smollm2-135m-instruct to answer every question as "
        f'{{"answer": ..., "category": ...}} with {"+".join(d.method for d in cfg.delta)}, then scoring it on '
        f"{len(prompts)} held-out prompts (new entities and phrasings).\n"
    )
    run_stage(cfg, log)

    model, tokenizer, deltas = load_for_inference(None, Path(cfg.output_dir) / "adapter", merge=False)
    log("\nscoring the base model (adapter disabled) and the tuned model on the held-out prompts ...")
    with deltas.disabled():
        base = score(model, tokenizer, prompts)
    tuned = score(model, tokenizer, prompts)

    log(f"\n{'':22s}{'base':>10s}{'tuned':>10s}")
    log(f"{'JSON format score':22s}{base['format_score']:>10.0%}{tuned['format_score']:>10.0%}")
    log(f"{'answer accuracy':22s}{base['answer_accuracy']:>10.0%}{tuned['answer_accuracy']:>10.0%}")
    examples = []
    for i in (0, len(prompts) // 2, len(prompts) - 1):
        examples.append({"prompt": prompts[i]["prompt"], "base": base["replies"][i], "tuned": tuned["replies"][i]})
        log(f"\nQ: {prompts[i]['prompt']}\n  base : {base['replies'][i][:160]!r}\n  tuned: {tuned['replies'][i]!r}")
    summary = update_summary(
        Path(cfg.output_dir),
        {
            "demo": {
                "heldout_prompts": len(prompts),
                "base": {k: base[k] for k in ("format_score", "answer_accuracy")},
                "tuned": {k: tuned[k] for k in ("format_score", "answer_accuracy")},
                "examples": examples,
            }
        },
    )
    log(f"\nrun directory: {cfg.output_dir} (adapter/, metrics.jsonl, loss.png, summary.json)")
    log(f'try it: deltatune generate --adapter {cfg.output_dir} "What is the capital of Peru?"')
    return summary
