"""The add-parameters family (adapter, prompt, ptuning, prefix, ptuning2) in a table-driven matrix.

(method config) x (model family): a tiny random Llama decoder (causal LM) and a tiny random BERT
encoder with a sequence-classification head. Every per-method fact lives in CASES (trainable-count
formula, whether the output equals the base at step 0, how far it must fit the tiny task); the
test bodies have no per-method branches. The cases use the same fields as the shared delta matrix
(tests/unit/test_delta_matrix.py), so they move there as they are.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltatune.deltas import DeltaSet, attach
from deltatune.deltas.registry import delta_config_class
from deltatune.export.peft_format import load_deltas, save_deltas

# ---- model families ------------------------------------------------------------------------------


def _from_config(cls_name: str, **config: Any) -> nn.Module:
    """A tiny random transformers model (the shapes of `tiny-llama` / `tiny-bert`, a small vocabulary;
    initializer_range 0.1 as `tiny-llama`, so the logits are not near-uniform and a delta can fit)."""
    import transformers

    model_cls = getattr(transformers, cls_name)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return model_cls(model_cls.config_class(**config, attn_implementation="sdpa"))


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], dict[str, torch.Tensor]]
    logits: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def _lm_loss(model, batch):
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1))


FAMILIES: dict[str, Family] = {
    "llama": Family(
        lambda: _from_config(
            "LlamaForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.1,
        ),
        lambda g: {"input_ids": torch.randint(0, 256, (2, 8), generator=g)},
        lambda m, b: m(input_ids=b["input_ids"]).logits,
        _lm_loss,
    ),
    "bert": Family(
        lambda: _from_config(
            "BertForSequenceClassification", vocab_size=512, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_labels=3, initializer_range=0.1,
        ),
        lambda g: {"input_ids": torch.randint(1, 512, (6, 8), generator=g), "labels": torch.arange(6) % 3},
        lambda m, b: m(input_ids=b["input_ids"]).logits,
        lambda m, b: F.cross_entropy(m(input_ids=b["input_ids"]).logits, b["labels"]),
    ),
}


@functools.cache
def _base(family: str) -> nn.Module:
    return FAMILIES[family].build().eval()


# ---- the facts per method: trainable-count formulas ----------------------------------------------

H, L, KV = 64, 2, 32  # hidden size, layers, key/value width (Llama: 2 kv heads x 16; BERT: 4 heads x 16 = 64)


def kv_dim(model: nn.Module) -> int:
    c = model.config
    return (getattr(c, "num_key_value_heads", None) or c.num_attention_heads) * (c.hidden_size // c.num_attention_heads)


def adapter_count(points_per_layer: int, m: int) -> Callable:
    """Per adapted output projection: down (H m + m) + up (m H + H)."""
    return lambda model: L * points_per_layer * (2 * H * m + m + H)


def prompt_count(k: int) -> Callable:
    return lambda model: k * H


def ptuning_mlp_count(k: int, h: int) -> Callable:
    """Embedding k H + Linear(H, h) + Linear(h, h) + Linear(h, H)."""
    return lambda model: k * H + (H * h + h) + (h * h + h) + (h * H + H)


def ptuning_lstm_count(k: int, h: int) -> Callable:
    """Embedding k H + 2-layer BiLSTM (per direction and layer: 4h (in + h) + 8h) + Linear(2h, 2h) + Linear(2h, H)."""
    lstm = 2 * (4 * h * (H + h) + 8 * h) + 2 * (4 * h * (2 * h + h) + 8 * h)
    return lambda model: k * H + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * H + H)


def prefix_count(k: int, h: int) -> Callable:
    """P' k kv + Linear(kv, h) + Linear(h, L 2 kv) (the reparameterisation)."""
    return lambda model: k * kv_dim(model) + kv_dim(model) * h + h + h * L * 2 * kv_dim(model) + L * 2 * kv_dim(model)


def ptuning2_count(k: int) -> Callable:
    """k keys and values per layer: k L 2 kv."""
    return lambda model: k * L * 2 * kv_dim(model)


@dataclass(frozen=True)
class Case:
    id: str
    config: list[dict[str, Any]]
    families: tuple[str, ...]
    count: Callable[[nn.Module], int]
    """Trainable parameters expected on the base model (the method's formula)."""
    identity_at_init: bool = True
    """The model's output at step 0 equals the base model's."""
    mergeable: bool = True
    lr: float = 1e-2
    fit: float = 0.5
    """After the fit steps the loss must be below this fraction of its start."""
    tol: float = 1e-5
    extra: dict[str, Any] = field(default_factory=dict)


LLAMA_BERT = ("llama", "bert")
# Adapters start as the identity (zero up-projection); the prompt methods change the input or the
# attention from step 0. None of them merges. Input-side prompts (prompt, ptuning) steer a small random
# model less than per-layer parameters do (Lester et al.: prompt tuning needs scale), hence their milder `fit`.
CASES: list[Case] = [
    Case("adapter-houlsby", [{"method": "adapter", "variant": "houlsby", "reduction_factor": 16}], LLAMA_BERT, adapter_count(2, 4), mergeable=False),
    Case("adapter-pfeiffer", [{"method": "adapter", "variant": "pfeiffer", "bottleneck": 8}], LLAMA_BERT, adapter_count(1, 8), mergeable=False),
    Case("adapter-parallel", [{"method": "adapter", "variant": "parallel", "bottleneck": 8, "where": ["attention", "mlp"]}], LLAMA_BERT, adapter_count(2, 8), mergeable=False),
    Case("prompt", [{"method": "prompt", "num_virtual_tokens": 4}], LLAMA_BERT, prompt_count(4), identity_at_init=False, mergeable=False, lr=3e-2, fit=0.8),
    Case("ptuning-mlp", [{"method": "ptuning", "num_virtual_tokens": 4, "encoder": "mlp", "encoder_hidden": 32}], LLAMA_BERT, ptuning_mlp_count(4, 32), identity_at_init=False, mergeable=False, lr=1e-2, fit=0.8),
    Case("ptuning-lstm", [{"method": "ptuning", "num_virtual_tokens": 4, "encoder": "lstm", "encoder_hidden": 16}], LLAMA_BERT, ptuning_lstm_count(4, 16), identity_at_init=False, mergeable=False, lr=1e-2, fit=0.8),
    Case("prefix", [{"method": "prefix", "num_virtual_tokens": 4, "projection_hidden": 32}], LLAMA_BERT, prefix_count(4, 32), identity_at_init=False, mergeable=False),
    Case("ptuning2", [{"method": "ptuning2", "num_virtual_tokens": 4, "dropout": 0.0}], LLAMA_BERT, ptuning2_count(4), identity_at_init=False, mergeable=False, lr=0.1),
]

MATRIX = [pytest.param(case, family, id=f"{case.id}-{family}") for case in CASES for family in case.families]


# ---- helpers (the same for every case) -----------------------------------------------------------


def build(case: Case, family: str) -> tuple[nn.Module, DeltaSet, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = copy.deepcopy(_base(family))
    configs = [delta_config_class(c["method"]).model_validate(c) for c in case.config]
    deltas = attach(model, configs)
    batch = FAMILIES[family].batch(torch.Generator().manual_seed(1))
    return model.eval(), deltas, batch


def outputs(model: nn.Module, family: str, batch) -> torch.Tensor:
    with torch.no_grad():
        return FAMILIES[family].logits(model, batch)


def perturb(deltas: DeltaSet) -> None:
    """Move every delta parameter away from its initial value (so round trips are not trivial)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in deltas.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def train_steps(model: nn.Module, deltas: DeltaSet, family: str, batch, steps: int, lr: float) -> list[float]:
    """`steps` AdamW steps; returns the losses (the last one in eval mode)."""
    optimizer = torch.optim.AdamW([p for _, p in deltas.named_parameters()], lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for _ in range(steps):
        loss = FAMILIES[family].loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    with torch.no_grad():
        losses.append(float(FAMILIES[family].loss(model, batch)))
    return losses


# ---- the checks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,family", MATRIX)
def test_output_at_init(case: Case, family: str) -> None:
    model, deltas, batch = build(case, family)
    base = outputs(_base(family), family, batch)
    same = torch.allclose(outputs(model, family, batch), base, atol=case.tol, rtol=0)
    assert same == case.identity_at_init


@pytest.mark.parametrize("case,family", MATRIX)
def test_trainable_count_matches_formula(case: Case, family: str) -> None:
    _, deltas, _ = build(case, family)
    assert deltas.num_trainable() == case.count(_base(family))
    assert deltas.num_trainable() > 0


@pytest.mark.parametrize("case,family", MATRIX)
def test_only_delta_parameters_change(case: Case, family: str) -> None:
    model, deltas, batch = build(case, family)
    delta_ids = {id(p) for _, p in deltas.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, deltas, family, batch, steps=3, lr=case.lr)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    moved_base = [n for n, p in model.named_parameters() if n in changed and id(p) not in delta_ids]
    assert not moved_base
    assert any(id(p) in delta_ids for n, p in model.named_parameters() if n in changed)


@pytest.mark.parametrize("case,family", MATRIX)
def test_disabled_gives_base(case: Case, family: str) -> None:
    model, deltas, batch = build(case, family)
    perturb(deltas)
    assert not torch.allclose(outputs(model, family, batch), outputs(_base(family), family, batch), atol=case.tol)
    with deltas.disabled():
        torch.testing.assert_close(outputs(model, family, batch), outputs(_base(family), family, batch), atol=case.tol, rtol=0)


@pytest.mark.parametrize("case,family", MATRIX)
def test_save_load_round_trip(case: Case, family: str, tmp_path) -> None:
    model, deltas, batch = build(case, family)
    perturb(deltas)
    expected = outputs(model, family, batch)
    save_deltas(deltas, tmp_path / "adapter", base_model=family)
    fresh = copy.deepcopy(_base(family))
    load_deltas(fresh, tmp_path / "adapter")
    torch.testing.assert_close(outputs(fresh.eval(), family, batch), expected, atol=case.tol, rtol=0)


@pytest.mark.parametrize("case,family", MATRIX)
def test_merge_unmerge(case: Case, family: str) -> None:
    model, deltas, batch = build(case, family)
    perturb(deltas)
    unmerged = outputs(model, family, batch)
    assert all(d.mergeable for d in deltas) == case.mergeable
    if not case.mergeable:
        with pytest.raises(TypeError):
            deltas.merge()
        torch.testing.assert_close(outputs(model, family, batch), unmerged, atol=0, rtol=0)
        return
    deltas.merge()
    torch.testing.assert_close(outputs(model, family, batch), unmerged, atol=case.tol, rtol=0)


@pytest.mark.parametrize("case,family", MATRIX)
def test_fits_tiny_task(case: Case, family: str) -> None:
    model, deltas, batch = build(case, family)
    losses = train_steps(model, deltas, family, batch, steps=40, lr=case.lr)
    assert losses[-1] < case.fit * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
