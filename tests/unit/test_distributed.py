"""Several processes (torchrun, gloo on CPU): data sharding, loss parity with one process, DDP and
FSDP2, gradient sync only on the last micro-step, checkpoints moving between world sizes, and a
failing rank ending the job.

Launching processes costs seconds of imports each, so the multi-process checks share two launches:
one torchrun of dist_worker.py running several jobs, and one `deltatune train --nproc 2` whose
rank 1 is killed. Every run uses a constant learning rate so runs of different lengths are
comparable step by step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deltatune.config import load_config
from deltatune.data.collate import Row
from deltatune.data.loader import BatchStream
from deltatune.errors import TrainingError
from deltatune.models.aliases import ALIASES
from deltatune.recipes import run_stage
from deltatune.train.checkpoint import checkpoints, load_checkpoint
from deltatune.train.logs import read_metrics
from tests.helpers import chat_rows, write_jsonl

WORKER = Path(__file__).with_name("dist_worker.py")
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _rows(n: int) -> list[Row]:
    return [Row(input_ids=[i], labels=[i]) for i in range(n)]


# ---- sharding (no processes needed) ----------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_cover_each_epoch_once_in_the_single_process_order(world):
    rows, batch = _rows(23), 2
    single = BatchStream(rows, batch * world, pad_id=0, seed=5)
    shards = [BatchStream(rows, batch, pad_id=0, seed=5) for _ in range(world)]
    for rank, stream in enumerate(shards):
        stream.shard(rank, world)
    for _ in range(2 * single.batches_per_epoch):  # two epochs
        together = [int(i) for s in shards for i in next(s)["input_ids"][:, 0]]
        assert together == [int(i) for i in next(single)["input_ids"][:, 0]]
    seen = [[int(i) for _ in range(s.batches_per_epoch) for i in next(s)["input_ids"][:, 0]] for s in shards]
    flat = [i for part in seen for i in part]
    assert len(flat) == len(set(flat)) == (23 // (batch * world)) * batch * world  # no overlap, only the tail dropped


def test_stream_position_moves_between_world_sizes():
    rows = _rows(40)
    two = [BatchStream(rows, 2, pad_id=0, seed=1) for _ in range(2)]
    for rank, stream in enumerate(two):
        stream.shard(rank, 2)
        for _ in range(3):
            next(stream)
    one = BatchStream(rows, 2, pad_id=0, seed=1)
    one.load_state_dict(two[0].state_dict())  # 12 rows consumed -> 6 micro-batches of 2
    later_two = [int(i) for s in two for i in next(s)["input_ids"][:, 0]]
    assert [int(i) for _ in range(2) for i in next(one)["input_ids"][:, 0]] == later_two
    odd = BatchStream(rows, 5, pad_id=0, seed=1)
    with pytest.raises(TrainingError, match="not a whole number"):
        odd.load_state_dict(two[0].state_dict())


# ---- shared runs ------------------------------------------------------------------------------------------
def _overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "model=tiny-llama",
        f"data.train={data}",
        "data.eval_split=0.25",  # 11 eval rows: with batches of 1, an uneven share for 2 ranks
        "data.max_length=64",
        "delta.dropout=0.0",
        "train.lr=1e-2",
        "train.schedule=constant",
        "train.warmup=0",
        "train.max_steps=4",
        "train.save_every=2",
        "train.eval_every=2",
        f"output_dir={out}",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process reference (global batch 4 as 2 x 2 micro-batches) and one torchrun launch
    of several 2-process jobs."""
    root = tmp_path_factory.mktemp("dist")
    data = write_jsonl(root / "train.jsonl", chat_rows(44))
    reference = root / "one"
    run_stage(load_config(None, _overrides(data, reference, "train.batch_size=2", "train.grad_accum=2")), log=lambda m: None)
    for name in ("ddp-resume", "fsdp-resume"):  # 1 -> 2 processes from the reference's step 2
        shutil.copytree(reference, root / name)
        shutil.rmtree(root / name / "checkpoints" / "step-4")
        shutil.rmtree(root / name / "adapter")
    jobs = [
        {"name": "occupied", "overrides": _overrides(data, reference), "expect_error": True},
        {"name": "generate", "prompts": PROMPTS},
        {"name": "ddp", "overrides": _overrides(data, root / "ddp", "train.batch_size=1", "train.grad_accum=2")},
        {
            "name": "ddp-resume",
            "overrides": _overrides(data, root / "ddp-resume", "train.batch_size=1", "train.grad_accum=2", "resume=true"),
        },
        {
            "name": "fsdp-resume",
            "overrides": _overrides(
                data, root / "fsdp-resume", "train.batch_size=1", "train.grad_accum=2", "train.distributed=fsdp", "resume=true"
            ),
        },
        {
            "name": "fault",
            "overrides": _overrides(data, root / "fault", "train.batch_size=2", "train.max_steps=6", "train.eval_every=0"),
            "fault_at": 3,
        },
    ]
    (root / "jobs.json").write_text(json.dumps(jobs))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER)]
    launch = _run_group([*command, str(root / "jobs.json"), str(root)], timeout=400)
    results = {p.stem: json.loads(p.read_text()) for p in root.glob("*-rank*.json")}
    return {"root": root, "data": data, "launch": launch, "results": results}


PROMPTS = [["Reverse apple", "Reverse tiger"], ["Reverse ocean", "Say hi"]]


def _losses(run_dir: Path) -> dict[int, tuple[float, ...]]:
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(run_dir) if "loss" in r}


def _eval_losses(run_dir: Path) -> list[float]:
    return [r["eval_loss"] for r in read_metrics(run_dir) if "eval_loss" in r]


def test_two_processes_give_the_one_process_loss_curve(runs):
    root = runs["root"]
    one, two = _losses(root / "one"), _losses(root / "ddp")
    assert sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6)
    assert one[4][0] < one[1][0] - 0.05  # it learned: the curves compared are not flat
    assert _eval_losses(root / "ddp") == pytest.approx(_eval_losses(root / "one"), rel=1e-5)
    # Gradients were exchanged once per optimizer step, not on each of the 2 micro-steps.
    assert [runs["results"][f"ddp-rank{r}"]["reductions"] for r in (0, 1)] == [4, 4]


def test_only_rank_zero_writes(runs):
    run_dir = runs["root"] / "ddp"
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 4]  # one line per step, not two
    assert len(list((run_dir / "tensorboard").iterdir())) == 1
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["processes"] == 2


def test_one_process_checkpoint_resumes_on_two(runs):
    root, one = runs["root"], _losses(runs["root"] / "one")
    for name in ("ddp-resume", "fsdp-resume"):
        resumed = _losses(root / name)
        for step in (3, 4):
            assert resumed[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), name
        assert _eval_losses(root / name)[-1] == pytest.approx(_eval_losses(root / "one")[-1], rel=1e-5)
    # FSDP also reduces once per optimizer step (steps 3 and 4), not per micro-step: once per
    # decoder block (a unit holding LoRA weights); the root unit holds only frozen weights.
    blocks = ALIASES["tiny-llama"].config["num_hidden_layers"]
    assert runs["results"]["fsdp-resume-rank0"]["reductions"] == blocks * 2


def test_a_rank_raising_ends_the_job(runs):
    launch, results = runs["launch"], runs["results"]
    assert launch.returncode != 0
    assert "injected fault on rank 1" in launch.stdout
    assert re.search(r"Root Cause[^\n]*\n.*\n.*\n.*\n\s*rank\s*:\s*1 \(local_rank: 1\)", launch.stdout)
    # Rank 0 stops at its next collective with a message (unless torchrun's SIGTERM got there first).
    error = results.get("fault-rank0", {}).get("error")
    assert error is None or "another rank has stopped" in error
    assert [step for step, _ in checkpoints(runs["root"] / "fault")] == [2]


def test_rank_zero_errors_reach_every_rank(runs):
    """The run directory is prepared by rank 0 alone; its refusal must stop rank 1 too (not leave it waiting)."""
    for rank in (0, 1):
        assert "already holds a run" in runs["results"][f"occupied-rank{rank}"]["error"]


def test_generation_with_fsdp_matches_one_process(runs):
    from deltatune.deltas import LoraConfig, attach
    from deltatune.inference import generate
    from deltatune.models import load_model

    model, tokenizer = load_model("tiny-llama")
    deltas = attach(model, LoraConfig(r=4, dropout=0.0))
    torch.manual_seed(0)
    for _, param in deltas.named_parameters():  # as dist_worker.py does
        param.data.normal_(0, 0.3)
    expected = [generate(model, tokenizer, prompts, max_new_tokens=6) for prompts in PROMPTS]
    with deltas.disabled():
        assert [generate(model, tokenizer, prompts, max_new_tokens=6) for prompts in PROMPTS] != expected
    for rank in (0, 1):
        assert runs["results"][f"generate-rank{rank}"]["replies"] == expected[rank]


def test_killed_rank_ends_the_job_and_the_checkpoint_resumes_on_one_process(runs, tmp_path):
    """`deltatune train --nproc 2` with FSDP; SIGKILL rank 1 after the step-2 checkpoint; resume with 1 process."""
    run_dir = tmp_path / "killed"
    config = tmp_path / "cfg.yaml"
    config.write_text("{}\n")
    args = _overrides(runs["data"], run_dir, "train.batch_size=2", "train.distributed=fsdp", "train.eval_every=0")
    args += ["train.max_steps=100000", "train.keep_checkpoints=100000"]
    log = (tmp_path / "out.log").open("w")
    job = subprocess.Popen(
        [sys.executable, "-m", "deltatune", "train", str(config), "--nproc", "2", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=ENV,
        start_new_session=True,
    )
    try:
        while not (run_dir / "checkpoints" / "step-2" / "state.pt").is_file():
            assert job.poll() is None, (tmp_path / "out.log").read_text()[-3000:]
            time.sleep(0.05)
        ranks = {_environ(pid).get("RANK"): pid for launcher in _children(job.pid) for pid in _children(launcher)}
        os.kill(ranks["1"], signal.SIGKILL)
        returncode = job.wait(timeout=120)  # no hang: the job ends on its own
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    output = (tmp_path / "out.log").read_text()
    assert returncode != 0
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", output)
    saved = checkpoints(run_dir)
    for _, path in saved:
        load_checkpoint(path)  # every checkpoint left behind is complete
    one = _losses(runs["root"] / "one")
    for step in (1, 2):
        assert _losses(run_dir)[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6)
    for step, path in saved:
        if step > 2:
            shutil.rmtree(path)
    resumed = load_config(None, [*args[:-2], "train.batch_size=2", "train.grad_accum=2", "resume=true"])
    run_stage(resumed, log=lambda m: None)
    for step in (3, 4):
        assert _losses(run_dir)[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6)


def _run_group(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run `command` in its own process group; on a timeout end the whole group (no stray workers)."""
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, start_new_session=True)
    try:
        output, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        output, _ = job.communicate()
        pytest.fail(f"{command} hung:\n{output[-3000:]}")
    return subprocess.CompletedProcess(command, job.returncode, output, "")


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
