"""Save and load deltas in Hugging Face PEFT's on-disk format.

An adapter directory holds `adapter_config.json` + `adapter_model.safetensors` with PEFT's key
names (`base_model.model.<module path>.lora_A.weight`), so `peft.PeftModel.from_pretrained(base,
dir)` loads what deltatune saves and deltatune loads what PEFT saves. Methods PEFT lacks use the
same layout with their own `peft_type` tag. Several composed deltas are saved as one directory
per delta (the first at the top, the others in sub-directories named in `deltatune.json`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from deltatune.deltas import DeltaSet, attach
from deltatune.deltas.base import Delta
from deltatune.deltas.inject import HEAD_NAMES
from deltatune.deltas.registry import delta_class_for_peft_type
from deltatune.errors import UserError

__all__ = ["save_deltas", "load_deltas", "read_adapter_config", "peft_task_type"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MANIFEST_NAME = "deltatune.json"

_TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}


_HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's `task_type` for a model class (FEATURE_EXTRACTION for a bare backbone such as
    `BertModel`, which PEFT's prompt-learning methods need; None for a masked LM)."""
    name = type(model).__name__
    task = next((task for suffix, task in _TASK_TYPES.items() if name.endswith(suffix)), None)
    if task is None and getattr(model, "base_model", None) is model:
        return "FEATURE_EXTRACTION"
    return task


def _write_atomic_dir(target: Path, fill) -> None:
    """Build a directory in a temporary sibling, then swap it in, so a crash never leaves half of one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        fill(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_one(
    delta: Delta, directory: Path, base_model: str, task_type: str | None, weights: dict[str, Tensor] | None = None
) -> None:
    state = None if weights is None else {name: weights[name] for name, _ in delta.named_parameters()}
    tensors = {key: t.detach().to("cpu").contiguous() for key, t in delta.export_state(state).items()}
    if task_type in _HEAD_TASKS and not any(set(k.split(".")) & set(HEAD_NAMES) for k in tensors):
        # PEFT's classification task types expect the head's weights in the adapter (modules_to_save);
        # an adapter without them loads in PEFT as a plain PeftModel, with the base model's head.
        task_type = None
    config = {**delta.peft_config(), "base_model_name_or_path": base_model, "task_type": task_type, "inference_mode": True}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_deltas(
    deltas: DeltaSet, directory: str | Path, base_model: str, weights: dict[str, Tensor] | None = None
) -> Path:
    """Write every delta of `deltas` under `directory` (atomically) and return the path.

    `weights` (full tensors by in-memory name) replaces the deltas' own values, e.g. when they are
    FSDP shards gathered by `deltatune.train.parallel.delta_weights`."""
    directory = Path(directory)
    task_type = peft_task_type(deltas.model)

    def fill(tmp: Path) -> None:
        _save_one(deltas[0], tmp, base_model, task_type, weights)
        extra = []
        for i, delta in enumerate(deltas.deltas[1:], start=1):
            sub = f"{i}-{delta.config.method}"
            (tmp / sub).mkdir()
            _save_one(delta, tmp / sub, base_model, task_type, weights)
            extra.append(sub)
        if extra:
            (tmp / MANIFEST_NAME).write_text(json.dumps({"also": extra}, indent=2) + "\n")

    _write_atomic_dir(directory, fill)
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The `adapter_config.json` of an adapter directory (a clear error if there is none)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise UserError(f"{directory} is not an adapter directory: {CONFIG_NAME} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None


def _config_of(peft: dict[str, Any], directory: Path):
    peft_type = peft.get("peft_type")
    cls = delta_class_for_peft_type(str(peft_type))
    if cls is None:
        raise UserError(f"{directory / CONFIG_NAME}: peft_type {peft_type!r} is not a method deltatune can load")
    if hasattr(cls, "config_from_peft") and peft.get("peft_type") == cls.peft_type:
        return cls.config_from_peft(peft)
    fields = {k: v for k, v in peft.items() if k in cls.config_class.model_fields}
    return cls.config_class.model_validate(fields)


def load_deltas(model: nn.Module, directory: str | Path, name: str = "default") -> DeltaSet:
    """Attach the deltas saved in `directory` (ours or PEFT's) to `model` and load their weights."""
    directory = Path(directory)
    dirs = [directory]
    manifest = directory / MANIFEST_NAME
    if manifest.is_file():
        dirs += [directory / sub for sub in json.loads(manifest.read_text())["also"]]
    configs = [_config_of(read_adapter_config(d), d) for d in dirs]
    deltas = attach(model, configs, name=name)
    for delta, d in zip(deltas, dirs, strict=True):
        weights = d / WEIGHTS_NAME
        if not weights.is_file():
            raise UserError(f"{d}: {WEIGHTS_NAME} is missing")
        delta.import_state(load_file(str(weights)), source=str(weights))
    return deltas

