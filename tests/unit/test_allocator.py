"""The allocator choice (train/allocator.py): when `deltatune` re-executes itself with tcmalloc,
and that a command run that way really trains under it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from deltatune.perf.synthetic import write_synthetic_chats
from deltatune.train import allocator
from deltatune.train.allocator import preload_env, tcmalloc_path, without_preload


def test_preload_env_adds_tcmalloc_once_and_respects_the_opt_out(monkeypatch):
    monkeypatch.setattr(allocator, "tcmalloc_path", lambda: "/lib/libtcmalloc_minimal.so.4")
    env = preload_env({"PATH": "/bin", "LD_PRELOAD": "/lib/libother.so"})
    assert env["LD_PRELOAD"] == "/lib/libtcmalloc_minimal.so.4 /lib/libother.so" and env["PATH"] == "/bin"
    assert preload_env(env) is None  # the re-executed process does not loop
    assert without_preload(env) == {"PATH": "/bin", "LD_PRELOAD": "/lib/libother.so"}
    assert without_preload(preload_env({"PATH": "/bin"})) == {"PATH": "/bin"}
    assert preload_env({"LD_PRELOAD": "/opt/libtcmalloc.so"}) is None  # the user's own preload wins
    assert preload_env({"DELTATUNE_MALLOC": "default"}) is None
    monkeypatch.setattr(allocator, "tcmalloc_path", lambda: None)
    assert preload_env({}) is None  # not installed: glibc with a fixed mmap threshold instead


@pytest.mark.skipif(tcmalloc_path() is None, reason="tcmalloc not installed (make allocator)")
def test_the_command_trains_under_tcmalloc_and_opts_out_on_request(tmp_path):
    data = write_synthetic_chats(tmp_path / "train.jsonl", 8, 60, spread=0.2)
    (tmp_path / "c.yaml").write_text("stage: sft\n")
    seen = {}
    for choice in ("auto", "default"):
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "DELTATUNE_ALLOCATOR_PRELOADED")}
        env["DELTATUNE_MALLOC"] = choice
        run = tmp_path / choice
        subprocess.run(
            [sys.executable, "-m", "deltatune", "train", str(tmp_path / "c.yaml"), "model=tiny-llama",
             f"data.train={data}", "data.max_length=64", "train.batch_size=4", "train.max_steps=1",
             f"output_dir={run}", "--force"],
            check=True, capture_output=True, env=env,
        )
        seen[choice] = json.loads((run / "summary.json").read_text())["allocator"]
    assert seen == {"auto": "tcmalloc", "default": "glibc"}
