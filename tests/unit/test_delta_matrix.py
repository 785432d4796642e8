"""One parametrised matrix over (method config) x (model family): every delta keeps the contract.

Families: a tiny random Llama decoder, a tiny random BERT encoder (with a classification head) and
a small CNN (for the methods that apply to convolutions). Every per-method fact lives in CASES
(expected trainable count, whether the output equals the base at step 0, whether it merges, how
far it must fit the tiny task); the test bodies have no per-method branches. Adding a method or a
variant is one `Case(...)` entry.
"""

from __future__ import annotations

import copy
import functools
import re
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


class SmallCNN(nn.Module):
    """Two conv blocks and a classifier: x [N, 3, 8, 8] -> logits [N, 4]."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU()),
        )
        self.classifier = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.blocks(x).flatten(1))


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], dict[str, torch.Tensor]]
    logits: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def _from_config(cls_name: str, **config: Any) -> nn.Module:
    """A tiny random transformers model (the shapes of the `tiny-llama` / `tiny-bert` aliases, a small
    vocabulary: the matrix needs no tokenizer), identical on every build."""
    import transformers

    model_cls = getattr(transformers, cls_name)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return model_cls(model_cls.config_class(**config, attn_implementation="sdpa"))


def _llama() -> nn.Module:
    return _from_config(
        "LlamaForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.15,
    )


def _bert() -> nn.Module:
    return _from_config(
        "BertForSequenceClassification", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        initializer_range=0.15,
    )


def _cnn() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return SmallCNN()


def _lm_loss(model, batch):
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1))


FAMILIES: dict[str, Family] = {
    "llama": Family(
        _llama,
        lambda g: {"input_ids": torch.randint(0, 256, (2, 8), generator=g)},
        lambda m, b: m(input_ids=b["input_ids"]).logits,
        _lm_loss,
    ),
    "bert": Family(
        _bert,
        lambda g: {"input_ids": torch.randint(1, 512, (6, 8), generator=g), "labels": torch.arange(6) % 3},
        lambda m, b: m(input_ids=b["input_ids"]).logits,
        lambda m, b: F.cross_entropy(m(input_ids=b["input_ids"]).logits, b["labels"]),
    ),
    "cnn": Family(
        _cnn,
        lambda g: {"x": torch.randn(8, 3, 8, 8, generator=g), "labels": torch.arange(8) % 4},
        lambda m, b: m(b["x"]),
        lambda m, b: F.cross_entropy(m(b["x"]), b["labels"]),
    ),
}


@functools.cache
def _base(family: str) -> nn.Module:
    return FAMILIES[family].build().eval()


# ---- the facts per method: trainable-count formulas ----------------------------------------------

HEADS = ("lm_head", "classifier", "score")


def _modules(model: nn.Module, kind: type[nn.Module], names: str | None = None) -> list[tuple[str, nn.Module]]:
    """Modules of `kind` (all but heads, or those whose name matches the regex `names`)."""
    return [
        (p, m)
        for p, m in model.named_modules()
        if isinstance(m, kind) and (re.search(names, p) if names else not any(h in p for h in HEADS))
    ]


def lora_count(r: int, names: str | None = None, rank: Callable[[str], int] | None = None) -> Callable:
    """r (in + out) per adapted Linear; r (in k k + out) per Conv2d; r (num + dim) per Embedding."""

    def count(model: nn.Module) -> int:
        total = 0
        for path, m in _modules(model, (nn.Linear, nn.Conv2d, nn.Embedding) if names else nn.Linear, names):
            k = rank(path) if rank else r
            if isinstance(m, nn.Linear):
                total += k * (m.in_features + m.out_features)
            elif isinstance(m, nn.Conv2d):
                total += k * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
            else:
                total += k * (m.num_embeddings + m.embedding_dim)
        return total

    return count


def dora_count(r: int) -> Callable:
    """LoRA + one magnitude per output feature."""
    return lambda model: lora_count(r)(model) + sum(m.out_features for _, m in _modules(model, nn.Linear))


def ia3_count(model: nn.Module) -> int:
    """out features of keys and values + in features of the second feed-forward projection."""
    kv = sum(m.out_features for _, m in _modules(model, nn.Linear, r"(k_proj|v_proj|key|value)$"))
    return kv + sum(m.in_features for _, m in _modules(model, nn.Linear, r"(down_proj|layer\.\d+\.output\.dense)$"))


def head_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(("classifier", "score")))


def bitfit_count(model: nn.Module) -> int:
    """Every existing bias + an added bias (out features) per bias-less non-head Linear + the task head's weight."""
    existing = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))
    added = sum(m.out_features for _, m in _modules(model, nn.Linear) if m.bias is None)
    head_weights = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("classifier", "score")) and not n.endswith("bias"))
    return existing + added + head_weights


def diffprune_count(model: nn.Module) -> int:
    """A difference and a log_alpha per weight entry of every non-head Linear."""
    return 2 * sum(m.weight.numel() for _, m in _modules(model, nn.Linear))


def all_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def top_blocks_count(n: int) -> Callable:
    """Parameters of the top n blocks + everything after the last block (final norm, pooler, head;
    a tied LM head is the embedding matrix, so it is not counted)."""

    def count(model: nn.Module) -> int:
        names = [(name, p) for name, p in model.named_parameters()]
        index = [int(m.group(1)) if (m := re.search(r"\.(?:layers|layer|blocks)\.(\d+)\.", f".{name}")) else None for name, _ in names]
        last = max(i for i in index if i is not None)
        first_after = max(k for k, i in enumerate(index) if i is not None) + 1
        return sum(p.numel() for (_, p), i in zip(names, index, strict=True) if i is not None and i > last - n) + sum(
            p.numel() for _, p in names[first_after:]
        )

    return count


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
CASES: list[Case] = [
    Case("lora", [{"method": "lora", "r": 4, "dropout": 0.0}], LLAMA_BERT, lora_count(4)),
    Case("lora-rslora", [{"method": "lora", "r": 4, "dropout": 0.0, "rslora": True}], LLAMA_BERT, lora_count(4)),
    Case("lora-gaussian", [{"method": "lora", "r": 4, "dropout": 0.0, "init": "gaussian"}], LLAMA_BERT, lora_count(4)),
    Case("lora-dora", [{"method": "lora", "r": 4, "dropout": 0.0, "use_dora": True}], LLAMA_BERT, dora_count(4)),
    Case("lora-pissa", [{"method": "lora", "r": 4, "dropout": 0.0, "init": "pissa"}], LLAMA_BERT, lora_count(4), tol=1e-4),
    Case(
        "lora-patterns",
        [{"method": "lora", "r": 4, "dropout": 0.0, "rank_pattern": {"v_proj|value": 2}, "alpha_pattern": {"q_proj|query": 32}}],
        LLAMA_BERT,
        lora_count(4, rank=lambda path: 2 if path.endswith(("v_proj", "value")) else 4),
    ),
    Case(
        "lora-embedding",
        [{"method": "lora", "r": 4, "dropout": 0.0, "target": ["word_embeddings", "query"]}],
        ("bert",),
        lora_count(4, r"(word_embeddings|query)$"),
    ),
    # tiny-llama ties the LM head to the input embeddings: a LoRA there cannot be merged.
    Case("lora-embedding-tied", [{"method": "lora", "r": 4, "target": ["embed_tokens"]}], ("llama",), lora_count(4, r"embed_tokens$"), mergeable=False, lr=3e-2),
    Case("lora-conv", [{"method": "lora", "r": 2, "target": r"blocks\.\d\.0", "dropout": 0.0}], ("cnn",), lora_count(2, r"blocks\.\d\.0$")),
    Case("ia3", [{"method": "ia3"}], LLAMA_BERT, ia3_count, lr=5e-2),
    Case("bitfit", [{"method": "bitfit"}], ("llama", "bert", "cnn"), bitfit_count, lr=3e-2),
    Case("diffprune", [{"method": "diffprune", "target_sparsity": 0.1}], LLAMA_BERT, diffprune_count),
    Case("full", [{"method": "full"}], ("llama", "bert", "cnn"), all_count, lr=3e-3),
    Case("freeze", [{"method": "freeze", "trainable_layers": 1}], ("llama", "bert", "cnn"), top_blocks_count(1), lr=3e-3),
    Case(
        "freeze-gradual",
        [{"method": "freeze", "trainable_layers": 2, "unfreeze_every": 10}],
        ("llama", "bert", "cnn"),
        top_blocks_count(2),
        lr=3e-3,
    ),
    Case("head", [{"method": "head"}], ("bert", "cnn"), head_params, lr=5e-2),
    Case(
        "lora+bitfit",
        [{"method": "lora", "r": 4, "dropout": 0.0}, {"method": "bitfit"}],
        LLAMA_BERT,
        lambda m: lora_count(4)(m) + bitfit_count(m),
    ),
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
    """Move every delta parameter away from its initial value (so merges and round trips are not trivial)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in deltas.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def train_steps(model: nn.Module, deltas: DeltaSet, family: str, batch, steps: int, lr: float) -> list[float]:
    """`steps` AdamW steps with the training loop's hooks; returns the losses (the last in eval mode after on_train_end)."""
    params = [p for _, p in deltas.named_parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(1, steps + 1):
        deltas.on_step(step)
        loss = FAMILIES[family].loss(model, batch)
        reg = deltas.regularizer()
        (loss + reg if reg is not None else loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    deltas.on_train_end()
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
        return
    deltas.merge()
    merged = outputs(model, family, batch)
    deltas.merge()  # merging twice is a no-op
    torch.testing.assert_close(outputs(model, family, batch), merged, atol=0, rtol=0)
    torch.testing.assert_close(merged, unmerged, atol=case.tol, rtol=0)
    deltas.unmerge()
    torch.testing.assert_close(outputs(model, family, batch), unmerged, atol=case.tol, rtol=0)
    with deltas.disabled():
        torch.testing.assert_close(outputs(model, family, batch), outputs(_base(family), family, batch), atol=case.tol, rtol=0)


FIT_STEPS = 40


@pytest.mark.parametrize("case,family", MATRIX)
def test_fits_tiny_task(case: Case, family: str) -> None:
    model, deltas, batch = build(case, family)
    losses = train_steps(model, deltas, family, batch, steps=FIT_STEPS, lr=case.lr)
    assert losses[-1] < case.fit * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
