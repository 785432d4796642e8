"""deltatune: fine-tune pretrained models with every method (deltas) and every stage (objectives).

    import deltatune
    model, tokenizer = deltatune.load_model("smollm2-135m-instruct")
    deltas = deltatune.attach(model, deltatune.LoraConfig(r=8))
    summary = deltatune.run(deltatune.load_config("configs/sft-lora.yaml"))

Names are imported on first use, so `deltatune --help` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_model": "deltatune.models",
    "load_tokenizer": "deltatune.models",
    "attach": "deltatune.deltas",
    "DeltaSet": "deltatune.deltas",
    "LoraConfig": "deltatune.deltas",
    "load_config": "deltatune.config",
    "RunConfig": "deltatune.config",
    "save_deltas": "deltatune.export.peft_format",
    "load_deltas": "deltatune.export.peft_format",
    "generate": "deltatune.inference",
    "load_for_inference": "deltatune.inference",
    "evaluate_run": "deltatune.eval.report",
    "load_run": "deltatune.predict",
    "classify_texts": "deltatune.predict",
    "tag_sentences": "deltatune.predict",
}

__all__ = [*_API, "run"]


def run(config, log=print) -> dict[str, Any]:
    """Run the recipe of `config.stage` (a RunConfig) and return the run's summary."""
    from deltatune.recipes import run_stage

    return run_stage(config, log)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'deltatune' has no attribute {name!r}")
