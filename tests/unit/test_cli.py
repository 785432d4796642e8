"""The deltatune command: help, clear errors without tracebacks, train -> generate, SIGTERM -> resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import chat_rows, write_jsonl


def deltatune(*args: str, cwd: Path | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deltatune", *args], capture_output=True, text=True, cwd=cwd, timeout=300, **kwargs)


def test_help_lists_every_subcommand():
    out = deltatune("--help").stdout
    for command in ("train", "generate", "chat", "demo", "models"):
        assert command in out
    assert "tiny-llama" in deltatune("models").stdout


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("model: tiny-llama\ndata: {trian: x.jsonl}\n", "data.trian: unknown key; did you mean 'train'?"),
        ("model: no-such-model\ndata: {train: DATA}\n", "unknown model 'no-such-model'"),
        ("model: tiny-llama\ndata: {train: MISSING}\n", "data file not found"),
        ("model: tiny-llama\ndata: {train: BROKEN}\n", "broken.jsonl:2: malformed JSON"),
    ],
)
def test_user_errors_exit_2_without_traceback(tmp_path, config, message):
    write_jsonl(tmp_path / "data.jsonl", chat_rows(4))
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{oops\n')
    config = config.replace("DATA", str(tmp_path / "data.jsonl")).replace("MISSING", str(tmp_path / "no.jsonl"))
    (tmp_path / "cfg.yaml").write_text(config.replace("BROKEN", str(tmp_path / "broken.jsonl")))
    result = deltatune("train", str(tmp_path / "cfg.yaml"), f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_train_then_generate_with_the_adapter(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(16))
    (tmp_path / "cfg.yaml").write_text(f"model: tiny-llama\ndata: {{train: {data}, max_length: 48}}\ntrain: {{max_steps: 2, batch_size: 4}}\n")
    result = deltatune("train", str(tmp_path / "cfg.yaml"), f"output_dir={tmp_path / 'run'}", "delta.r=2")
    assert result.returncode == 0, result.stderr
    assert "trainable" in result.stdout and (tmp_path / "run/adapter/adapter_model.safetensors").is_file()
    result = deltatune("generate", "--adapter", str(tmp_path / "run"), "--max-new-tokens", "4", "Reverse apple")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()  # a tiny random model says something (4 tokens)


def test_sigterm_checkpoints_and_resume_finishes(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(64))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: tiny-llama\ndata: {{train: {data}, max_length: 48}}\ntrain: {{max_steps: 100000, batch_size: 2}}\n")
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "deltatune", "train", str(cfg), f"output_dir={run}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").is_file():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "resume: true" in err and "Traceback" not in err
    checkpoint = next((run / "checkpoints").iterdir())
    step = int(checkpoint.name.split("-")[1])
    assert (checkpoint / "state.pt").is_file() and step >= 1
    result = deltatune("train", str(cfg), f"output_dir={run}", "resume=true", f"train.max_steps={step + 1}")
    assert result.returncode == 0, result.stderr
    assert f"resumed from {checkpoint}" in result.stdout
    assert os.path.isfile(run / f"checkpoints/step-{step + 1}/state.pt")


def test_inference_uses_the_template_training_used(tmp_path):
    from deltatune.data.tokenize import CHATML_TEMPLATE
    from deltatune.deltas import LoraConfig, attach
    from deltatune.export.peft_format import save_deltas
    from deltatune.inference import build_prompt, generate, load_for_inference, save_chat_template
    from deltatune.models import load_model

    model, tokenizer = load_model("tiny-llama")
    tokenizer.chat_template = None  # a base model without a chat template: training used ChatML
    save_deltas(attach(model, LoraConfig(r=2)), tmp_path / "a", base_model="tiny-llama")
    save_chat_template(tokenizer, tmp_path / "a")
    loaded, tok, _ = load_for_inference(None, tmp_path / "a")
    assert tok.chat_template == CHATML_TEMPLATE
    assert build_prompt(tok, "hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert isinstance(generate(loaded, tok, ["hi"], max_new_tokens=3)[0], str)


def test_chat_session(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(8))
    (tmp_path / "cfg.yaml").write_text(f"model: tiny-llama\ndata: {{train: {data}, max_length: 48}}\ntrain: {{max_steps: 1, batch_size: 4}}\n")
    assert deltatune("train", str(tmp_path / "cfg.yaml"), f"output_dir={tmp_path / 'run'}").returncode == 0
    result = deltatune("chat", "--adapter", str(tmp_path / "run"), "--max-new-tokens", "3", input="Reverse apple\n/reset\nhello\n\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("model> ") == 2
