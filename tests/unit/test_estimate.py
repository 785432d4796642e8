"""The memory estimator: agreement with recorded measurements (tests/data/estimator_table.json,
made by benchmarks/estimator_table.py on the reference machine), one live measurement of a tiny
run, how the parts move with the config, and the refusal with a config that fits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deltatune.config import load_config
from deltatune.errors import TrainingError
from deltatune.perf.estimate import EstimateContext, estimate, variant
from deltatune.perf.fit import check_fits
from deltatune.perf.synthetic import write_synthetic_chats

TABLE = Path(__file__).resolve().parents[1] / "data" / "estimator_table.json"
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def _config(tmp_path: Path, row: dict):
    from estimator_table import overrides_for, write_data

    data = write_data(row["data"], tmp_path)
    overrides = overrides_for(row["name"], data, row["steps"], tmp_path / "run")
    return load_config(None, ["stage=sft", *overrides])


def test_estimator_agrees_with_recorded_peak_rss_within_15_percent(tmp_path):
    """The issue's bar: at least 6 different configs within 15% of the measured peak RSS (all 8
    are, since tcmalloc and the chunked loss: docs/performance.md)."""
    table = json.loads(TABLE.read_text())
    rows = table["rows"]
    assert len(rows) >= 6 and len({json.dumps(r["overrides"]) for r in rows}) == len(rows)
    errors = {}
    for row in rows:
        predicted = estimate(_config(tmp_path, row)).peak_memory_bytes
        errors[row["name"]] = predicted / row["measured_bytes"] - 1
    report = "\n".join(f"{name}: {error:+.1%}" for name, error in errors.items())
    assert sum(abs(e) <= 0.15 for e in errors.values()) >= 6, report
    assert all(abs(e) <= 0.15 for e in errors.values()), report


def test_live_tiny_run_peak_rss_matches_the_estimate(tmp_path):
    data = write_synthetic_chats(tmp_path / "train.jsonl", 16, 120, spread=0.2)
    overrides = [
        "model=tiny-llama", f"data.train={data}", "data.max_length=128", "train.batch_size=4",
        "train.max_steps=2", f"output_dir={tmp_path / 'run'}",
    ]
    (tmp_path / "c.yaml").write_text("stage: sft\n")
    subprocess.run([sys.executable, "-m", "deltatune", "train", str(tmp_path / "c.yaml"), *overrides, "--force"],
                   check=True, capture_output=True)
    measured = json.loads((tmp_path / "run" / "summary.json").read_text())["peak_memory_bytes"]
    predicted = estimate(load_config(tmp_path / "c.yaml", overrides)).peak_memory_bytes
    assert abs(predicted / measured - 1) < 0.15, (predicted, measured)


@pytest.fixture(scope="module")
def smol_ctx(tmp_path_factory):
    data = write_synthetic_chats(tmp_path_factory.mktemp("smol") / "train.jsonl", 32, 300, spread=0.1)
    cfg = load_config(None, ["model=smollm2-135m-instruct", f"data.train={data}", "data.max_length=256",
                             "train.batch_size=8", "train.max_steps=2", "delta.r=16"])
    return cfg, EstimateContext(cfg)


def test_parts_follow_the_config(smol_ctx):
    cfg, ctx = smol_ctx
    lora = ctx.estimate(cfg)
    assert lora.batch.rows == 8 and lora.batch.length == 256
    # r x (in + out) for q, o (576->576), k, v (576->192), gate, up, down (576<->1536) in 30 blocks
    assert lora.trainable_params == 30 * 16 * (2 * 1152 + 2 * 768 + 3 * 2112) == 4_884_480
    smaller = ctx.estimate(variant(cfg, train__batch_size=4, train__grad_accum=2))
    assert smaller.activations == pytest.approx(lora.activations / 2, rel=0.01)
    ckpt = ctx.estimate(variant(cfg, train__gradient_checkpointing=True))
    assert ckpt.activations < lora.activations / 5
    nf4 = ctx.estimate(variant(cfg, quantize="nf4"))
    int8 = ctx.estimate(variant(cfg, quantize="int8"))
    # the 28M-parameter tied embedding stays fp32; the 106M Linear weights shrink 7x / 3.6x
    assert nf4.weights < int8.weights < lora.weights
    assert 0.25 < nf4.weights / lora.weights < 0.35
    full = ctx.estimate(cfg, "full", method="full")
    assert full.trainable_params == full.total_params == 134_515_008
    # LoRA keeps more activations than full fine-tuning: each adapter saves its dropout mask and
    # dropped input (PERFORMANCE.md saw the same with PEFT)
    assert full.optimizer == 8 * full.total_params and full.activations < lora.activations
    import copy

    fsdp = copy.copy(ctx)
    fsdp.world_size, fsdp.strategy = 4, "fsdp"
    sharded = fsdp.estimate(cfg, "full", method="full")
    assert sharded.optimizer == full.optimizer // 4 and sharded.peak_memory_bytes < full.peak_memory_bytes


def test_train_refuses_with_numbers_and_a_config_that_fits(smol_ctx):
    cfg, ctx = smol_ctx
    need = ctx.estimate(cfg).peak_memory_bytes
    with pytest.raises(TrainingError) as info:
        check_fits(cfg, available=int(need * 0.7), log=lambda _: None)
    message = str(info.value)
    assert "needs about" in message and "--force" in message and "A config that fits" in message
    overrides = message.split("add  ")[1].split("\n")[0].split()
    fixed = load_config(None, overrides, base=cfg.model_dump(mode="json"))
    assert fixed.train.batch_size * fixed.train.grad_accum == cfg.train.batch_size * cfg.train.grad_accum
    assert ctx.estimate(fixed).peak_memory_bytes <= need * 0.7
    assert check_fits(cfg, available=need * 2, log=lambda _: None).peak_memory_bytes == need


def test_estimate_cli_json(tmp_path):
    from typer.testing import CliRunner

    from deltatune.cli.main import app

    data = write_synthetic_chats(tmp_path / "train.jsonl", 8, 100)
    (tmp_path / "c.yaml").write_text(f"model: tiny-llama\ndata:\n  train: {data}\n  max_length: 128\ntrain:\n  max_steps: 2\n")
    result = CliRunner().invoke(app, ["estimate", str(tmp_path / "c.yaml"), "--json", "--no-probe"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    assert out["peak_memory_bytes"] > out["weights"] > 0
    assert set(out["compare"]) == {"full", "full +checkpointing", "lora", "lora +checkpointing", "qlora", "qlora +checkpointing"}
