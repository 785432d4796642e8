"""Run by torchrun from test_distributed.py: several deltatune runs in one launch (each launch costs
seconds of imports on every rank). Usage: torchrun ... dist_worker.py JOBS.json

Each job is {"name", "overrides": [...], "fault_at": optional loss call on which rank 1 raises,
"expect_error": optional}, or {"name", "prompts": [[rank 0's prompts], [rank 1's]]} to generate
with an FSDP-sharded model.
Every rank writes OUT/<name>-rank<r>.json with what the test checks: how many gradient
reductions ran (DDP comm-hook calls, FSDP reduce-scatters) and the error it stopped with, if any.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.fsdp._fully_shard import _fsdp_param_group

import deltatune.recipes.sft as sft
import deltatune.train.loop as loop
from deltatune.config import load_config
from deltatune.errors import UserError
from deltatune.recipes import run_stage

torch.set_num_threads(1)
counts = {"reductions": 0, "loss_calls": 0}
real_wrap, real_reduce, real_loss = loop.wrap, _fsdp_param_group.foreach_reduce, sft.lm_loss


def counting_wrap(*args, **kwargs):
    wrapped = real_wrap(*args, **kwargs)
    if wrapped.mode == "ddp":

        def hook(state, bucket):
            counts["reductions"] += 1
            return default_hooks.allreduce_hook(state, bucket)

        wrapped.root.register_comm_hook(None, hook)
    return wrapped


def counting_reduce(*args, **kwargs):
    counts["reductions"] += 1
    return real_reduce(*args, **kwargs)


loop.wrap = counting_wrap
_fsdp_param_group.foreach_reduce = counting_reduce


def generate_sharded(prompts: list[str]) -> list[str]:
    """Greedy replies of tiny-llama + LoRA sharded by FSDP, for this rank's prompts."""
    from deltatune.deltas import LoraConfig, attach
    from deltatune.inference import generate
    from deltatune.models import load_model
    from deltatune.train import dist
    from deltatune.train.parallel import wrap

    with dist.session("cpu"):
        model, tokenizer = load_model("tiny-llama")
        deltas = attach(model, LoraConfig(r=4, dropout=0.0))
        torch.manual_seed(0)
        for _, param in deltas.named_parameters():  # LoRA B starts at zero: give the delta an effect
            param.data.normal_(0, 0.3)
        wrap(model, deltas, "fsdp", torch.device("cpu"))
        return generate(model, tokenizer, prompts, max_new_tokens=6)


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    for job in jobs:
        counts.update(reductions=0, loss_calls=0)
        if "prompts" in job:
            replies = generate_sharded(job["prompts"][rank])
            (out / f"{job['name']}-rank{rank}.json").write_text(json.dumps({"replies": replies}))
            continue

        def loss(model, batch, fault_at=job.get("fault_at")):
            counts["loss_calls"] += 1
            if rank == 1 and counts["loss_calls"] == fault_at:
                raise RuntimeError("injected fault on rank 1")
            return real_loss(model, batch)

        sft.lm_loss = loss
        result = {}
        try:
            run_stage(load_config(None, job["overrides"]), log=lambda message: None)
        except UserError as exc:
            result["error"] = str(exc)
        finally:
            (out / f"{job['name']}-rank{rank}.json").write_text(json.dumps({**counts, **result}))
        if "error" in result and not job.get("expect_error"):
            sys.exit(2)


if __name__ == "__main__":
    main()
