"""Load a base model and its tokenizer from an alias, a local directory, a .gguf file or a hub id.

A GGUF file is dequantized once (tens of seconds) and cached as a safetensors checkpoint under
`cache_root()/models/`, so later loads take a second or two. Loading never runs code from a
checkpoint: safetensors only, and `trust_remote_code` only when the caller asks for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from deltatune.errors import UserError
from deltatune.models.aliases import ALIASES, PackagedModel, RandomModel, known_aliases, packaged_path
from deltatune.models.packed_attention import use_packed_attention

__all__ = ["TASKS", "cache_root", "load_model", "load_tokenizer", "resolve_model_source"]

log = logging.getLogger(__name__)

TASKS = {
    "causal-lm": AutoModelForCausalLM,
    "masked-lm": AutoModelForMaskedLM,
    "seq-cls": AutoModelForSequenceClassification,
    "token-cls": AutoModelForTokenClassification,
    "base": AutoModel,
}
"""Model heads by task name; a new head (classification) is initialised when the checkpoint lacks it."""


def cache_root() -> Path:
    """Where converted models and other caches live (`DELTATUNE_CACHE`, default ~/.cache/deltatune)."""
    return Path(os.environ.get("DELTATUNE_CACHE", Path.home() / ".cache" / "deltatune"))


def _gguf_cache_dir(gguf: Path, name: str) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{name}-{key}"


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a .gguf into a safetensors checkpoint directory (written atomically)."""
    if (target / "config.json").is_file():
        return target
    log.warning("converting %s to safetensors once (cached in %s) ...", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain fp32 after loading, but the GGUF quantization marker makes
    # save_pretrained refuse; clearing it gives a checkpoint identical to a fresh GGUF load.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "deltatune_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_source(spec: str) -> str | Path | RandomModel:
    """Where `spec` loads from: a local directory, a hub id, or a RandomModel recipe."""
    entry = ALIASES.get(spec)
    if isinstance(entry, RandomModel):
        return entry
    if isinstance(entry, PackagedModel):
        path = packaged_path(spec)
        return _convert_gguf(path, _gguf_cache_dir(path, spec)) if path.suffix == ".gguf" else path
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model file not found: {path}")
        return _convert_gguf(path, _gguf_cache_dir(path, path.stem))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model directory {path} has no config.json (is it a Hugging Face model directory?)")
        return path
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec  # a hub id: loads when online
    raise UserError(
        f"unknown model '{spec}': not a built-in alias, a local model directory, or a .gguf file. "
        f"Built-in aliases: {', '.join(known_aliases())}"
    )


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer for `spec`, with a pad token (the EOS token when the model defines none)."""
    source = resolve_model_source(spec)
    if isinstance(source, RandomModel):
        return load_tokenizer(source.tokenizer_from)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise UserError(f"could not load the tokenizer of '{spec}': {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    return tokenizer


def _build_random(entry: RandomModel, task: str, tokenizer: PreTrainedTokenizerBase, **config_kwargs) -> nn.Module:
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    config = AutoConfig.for_model(entry.family, vocab_size=len(tokenizer), **{**special, **entry.config, **config_kwargs})
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same tiny model on every build
        return TASKS[task].from_config(config, attn_implementation="sdpa")


def load_model(
    spec: str,
    task: str = "causal-lm",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    quantize: str = "none",
    **config_kwargs,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) for `spec`.

    Args:
        spec: alias (`deltatune models`), local HF directory, .gguf file, or hub id.
        task: one of TASKS (`causal-lm`, `masked-lm`, `seq-cls`, `token-cls`, `base`).
        dtype: parameter dtype of the loaded model.
        quantize: `nf4` or `int8` stores the Linear weights (not the heads) quantized and frozen
            (QLoRA; see deltatune.models.quantize); `none` keeps them as loaded.
        config_kwargs: passed to the model config (e.g. `num_labels`, `id2label` for classifiers).
    """
    if task not in TASKS:
        raise UserError(f"unknown task '{task}'; one of: {', '.join(TASKS)}")
    tokenizer = load_tokenizer(spec, trust_remote_code=trust_remote_code)
    source = resolve_model_source(spec)
    if isinstance(source, RandomModel):
        model = _build_random(source, task, tokenizer, **config_kwargs).to(dtype)
    else:
        try:
            model = TASKS[task].from_pretrained(
                source, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation="sdpa", **config_kwargs
            )
        except OSError as exc:
            raise UserError(f"could not load model '{spec}': {exc}") from None
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.name_or_path = spec
    if task == "causal-lm":
        use_packed_attention(model)  # packed rows: each document attends only to itself, at its own cost
    if quantize != "none":
        from deltatune.models.quantize import quantize_model

        quantize_model(model, quantize)
    return model, tokenizer
