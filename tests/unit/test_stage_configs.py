"""The example configs of the pt/mlm/classify/tokens stages (each also runs briefly in test_configs.py):
the mlm -> classify chain through the exported encoder, and the shared held-out split."""

from __future__ import annotations

from pathlib import Path

from deltatune.config import load_config
from deltatune.recipes import run_stage

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = {"minilm-l6": "tiny-bert", "smollm2-135m-instruct": "tiny-llama"}
QUIET = lambda *_: None  # noqa: E731


def _short(path: Path, tmp: Path, *extra: str) -> list[str]:
    return [f"output_dir={tmp / path.stem}", "train.max_steps=2", "train.batch_size=4", "data.max_samples=24", *extra]


def test_mlm_then_classify_from_the_exported_encoder(tmp_path: Path):
    mlm_path, classify_path = CONFIGS / "mlm-tweets.yaml", CONFIGS / "classify-tweets-after-mlm.yaml"
    mlm = run_stage(load_config(mlm_path, _short(mlm_path, tmp_path, "model=tiny-bert")), QUIET)
    exported = Path(mlm["exported_model"])
    assert (exported / "model.safetensors").is_file() and (exported / "tokenizer.json").is_file()
    cfg = load_config(classify_path, _short(classify_path, tmp_path, f"model={exported}"))
    summary = run_stage(cfg, QUIET)
    assert summary["model"] == str(exported) and "accuracy" in summary["eval_metrics"]


def test_mlm_and_classify_configs_hold_out_the_same_tweets(tmp_path: Path):
    from deltatune.data.dataset import read_splits
    from deltatune.data.readers import read_records
    from deltatune.data.text import read_texts

    mlm = load_config(CONFIGS / "mlm-tweets.yaml")
    classify = load_config(CONFIGS / "classify-tweets-lora.yaml")
    _, mlm_eval = read_splits(mlm.data, lambda p: read_texts(p, mlm.data.format), mlm.train.seed)
    _, classify_eval = read_splits(classify.data, read_records, classify.train.seed)
    assert len(mlm_eval) == 1000
    assert [source for _, source in mlm_eval] == [r.source for r in classify_eval]
