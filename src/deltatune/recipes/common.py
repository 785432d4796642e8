"""Small steps every recipe shares: start a run, attach the deltas (training any new head), evaluate,
save. Each is a plain function so a recipe still reads top to bottom."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from deltatune.config import RunConfig, config_to_yaml
from deltatune.data.collate import Row, collate
from deltatune.data.loader import BatchStream
from deltatune.deltas import DeltaSet, attach
from deltatune.deltas.select import Head, HeadConfig, find_head_modules
from deltatune.errors import UserError
from deltatune.export.outputs import save_outputs
from deltatune.inference import save_chat_template
from deltatune.models import load_model
from deltatune.models.packed_attention import splits_documents
from deltatune.train.allocator import allocator_in_use
from deltatune.train.dist import is_main, world_size
from deltatune.train.logs import plot_losses
from deltatune.train.loop import LossFn, TrainResult, autocast_for, evaluate, resolve_device
from deltatune.train.parallel import delta_weights
from deltatune.train.rundir import prepare_run_dir
from deltatune.train.summary import peak_memory_bytes, update_summary

__all__ = [
    "EvalSetup",
    "start_run",
    "seed_all",
    "attach_deltas",
    "train_head_too",
    "classifier_head",
    "mlm_head",
    "eval_loss_fn",
    "finish_run",
    "load_base",
    "trained_run_dir",
    "load_trained",
]

ADAPTER_DIR = "adapter"


@dataclass
class EvalSetup:
    """What `deltatune eval` needs from a stage: the trained model, its deltas, a fresh iterator
    over the eval batches, and keyword context for the stage's metric function."""

    model: nn.Module
    deltas: DeltaSet
    batches: Callable[[], Iterable[dict[str, torch.Tensor]]]
    context: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    """Numbers that depend on the data only (e.g. the majority-class baseline)."""


def seed_all(seed: int) -> None:
    """Seed Python and torch (data order, dropout, and the initialisation of new heads)."""
    random.seed(seed)
    torch.manual_seed(seed)


def start_run(cfg: RunConfig, log: Callable[[str], None]) -> Path:
    """Prepare the run directory (refusing to clobber another run), log the resolved config, seed."""
    run_dir = prepare_run_dir(cfg)
    log(f"config (saved to {run_dir / 'config.yaml'}):\n{config_to_yaml(cfg)}")
    seed_all(cfg.train.seed)
    return run_dir


def classifier_head(model: nn.Module) -> list[str]:
    """Parameter names of the task head (`classifier`, `score`, ...) of a classification model."""
    modules = find_head_modules(model)
    return [
        name
        for name, _ in model.named_parameters()
        if any(name == m or name.startswith(f"{m}.") for m in modules)
    ]


def mlm_head(model: nn.Module) -> list[str]:
    """Parameter names of an MLM head (BERT's `cls.predictions` transform and bias), except the
    decoder weight shared with the input embeddings. Checkpoints of sentence encoders such as
    MiniLM ship without this head, so it starts untrained."""
    output = model.get_output_embeddings()
    path = next((p for p, m in model.named_modules() if m is output), "")
    parent = path.rpartition(".")[0] if path else ""
    tied = {id(p) for p in model.get_input_embeddings().parameters()}
    prefix = f"{parent}." if parent else f"{path}."
    return [name for name, p in model.named_parameters() if name.startswith(prefix) and id(p) not in tied]


def train_head_too(model: nn.Module, deltas: DeltaSet, names: list[str], log: Callable[[str], None]) -> None:
    """Make sure the parameters `names` (a new head) train: if the chosen deltas leave some of them
    frozen (LoRA, prefix, ... never touch heads), add a `head` delta over those, as PEFT's
    `modules_to_save` does for classification heads. It is saved with the run like any delta."""
    trained = {id(p) for _, p in deltas.named_parameters()}
    params = dict(model.named_parameters())
    missing = [n for n in names if n in params and id(params[n]) not in trained]
    if not missing:
        return
    head = Head(HeadConfig(modules=missing), name="head").attach(model)
    deltas.deltas.append(head)
    log(f"the new head ({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}) is not trained by "
        f"{'+'.join(d.config.method for d in deltas.deltas[:-1])}: added a `head` delta for it")


def attach_deltas(
    model: nn.Module,
    cfg: RunConfig,
    device: torch.device,
    log: Callable[[str], None],
    head: Callable[[nn.Module], list[str]] | None = None,
) -> DeltaSet:
    """Freeze `model`, attach `cfg.delta` (and a head delta when `head` names untrained parameters),
    move it to `device` and log the trainable share."""
    deltas = attach(model, cfg.delta)
    if head is not None:
        train_head_too(model, deltas, head(model), log)
    model.to(device)
    trainable, total = deltas.num_trainable(), deltas.num_total()
    log(f"model {cfg.model}: {total:,} parameters, {trainable:,} trainable ({100 * trainable / total:.3f}%)")
    return deltas


def lm_train_stream(cfg: RunConfig, rows: Sequence[Row], pad_id: int, model: nn.Module) -> BatchStream:
    """The training stream of a causal-LM recipe (pt, sft). With `data.packing` and attention that
    splits packed rows into documents, each micro-batch goes in as one padding-free row."""
    single_row = cfg.data.packing and splits_documents(model)
    return BatchStream(rows, cfg.train.batch_size, pad_id, seed=cfg.train.seed,
                       collate_fn=lambda batch_rows, _epoch: collate(batch_rows, pad_id, single_row=single_row))


def eval_loss_fn(
    model: nn.Module,
    batches: Callable[[], Iterable[dict[str, torch.Tensor]]],
    loss_fn: LossFn,
    cfg: RunConfig,
    device: torch.device,
) -> Callable[[], float]:
    """The loop's `eval_fn`: mean loss per unit over a fresh pass of the eval batches."""
    return lambda: evaluate(model, batches(), loss_fn, device, lambda: autocast_for(cfg.train, device))


def finish_run(
    cfg: RunConfig,
    run_dir: Path,
    deltas: DeltaSet,
    result: TrainResult | None,
    device: torch.device,
    log: Callable[[str], None],
    extra: dict[str, Any] | None = None,
    chat_tokenizer: PreTrainedTokenizerBase | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict[str, Any]:
    """Save the deltas (PEFT layout) under run_dir/adapter (with `chat_tokenizer`'s chat template,
    which generation then uses; plus run_dir/model for `full`), plot the losses, write summary.json.

    `result` is the loop's (None for recipes with their own loop, which put their numbers in
    `extra`). Under several processes every rank calls this (FSDP gathers the weights
    collectively) and only rank 0 writes; the others get the summary values back."""
    weights = delta_weights(deltas.model, deltas)
    values: dict[str, Any] = {
        "model": cfg.model,
        "stage": cfg.stage,
        "methods": [d.config.method for d in deltas],
        "trainable_params": deltas.num_trainable(),
        "total_params": deltas.num_total(),
    }
    if result is not None:
        values.update(
            steps=result.step,
            final_loss=result.final_loss,
            final_eval_loss=result.final_eval_loss,
            train_tokens=result.train_tokens,
            tokens_per_s=result.tokens_per_s,
            wall_s=result.wall_s,
        )
    values.update(
        peak_memory_bytes=peak_memory_bytes(device), allocator=allocator_in_use(), processes=world_size(), **(extra or {})
    )
    if not is_main():
        return values
    saved = save_outputs(deltas, run_dir, cfg.model, tokenizer or chat_tokenizer, log, weights=weights)
    if chat_tokenizer is not None:
        save_chat_template(chat_tokenizer, saved["adapter"])
    plot_losses(run_dir)
    summary = update_summary(run_dir, values)
    log(f"saved {' and '.join(str(p) for p in saved.values())}; summary in {run_dir / 'summary.json'}")
    return summary


def load_base(cfg: RunConfig, task: str, labels=None, tokenizer=None) -> nn.Module:
    """`cfg.model` for `task` (`causal-lm`, `masked-lm`, `seq-cls`, `token-cls`), with a head for
    `labels` (a LabelSet) when given. New heads are initialised right after seeding with
    `train.seed`, so training, `deltatune eval` and `deltatune predict` all start from the same head.
    With `quantize` set, the base's linear layers are stored in NF4/int8 (QLoRA)."""
    seed_all(cfg.train.seed)
    if labels is None:
        return load_model(cfg.model, task=task, quantize=cfg.quantize)[0]
    model, _ = load_model(
        cfg.model, task=task, quantize=cfg.quantize, id2label=labels.id2label, label2id=labels.label2id
    )
    # decoder classifiers find each sequence's last token by the pad id: it must be the tokenizer's
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def trained_run_dir(cfg: RunConfig) -> Path:
    """`cfg.output_dir`, checked to hold a finished run (an adapter)."""
    run_dir = Path(cfg.output_dir)
    if not (run_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        raise UserError(f"{run_dir} holds no trained adapter: train first (deltatune train CONFIG)")
    return run_dir


def load_trained(
    cfg: RunConfig, run_dir: Path, task: str, labels=None, tokenizer=None
) -> tuple[nn.Module, DeltaSet]:
    """The run's base model (a new head initialised with the run's seed, as in training, when
    `labels` are given) with the deltas it saved attached, on the configured device, in eval mode."""
    from deltatune.export.peft_format import load_deltas

    model = load_base(cfg, task, labels, tokenizer)
    deltas = load_deltas(model, Path(run_dir) / ADAPTER_DIR)
    model.to(resolve_device(cfg.train.device)).eval()
    return model, deltas
