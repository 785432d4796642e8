"""reward, dpo, ppo and grpo end to end for a few steps on tiny-llama; the reference model is the
base model with the delta disabled; rollout log-probs; reward sources."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from deltatune.config import load_config
from deltatune.data.preference import load_pairs, to_prompt
from deltatune.data.readers import Record, read_records
from deltatune.deltas import LoraConfig, attach
from deltatune.errors import ConfigError, TrainingError
from deltatune.models import load_model
from deltatune.recipes import run_stage
from deltatune.recipes.dpo import reference_logps
from deltatune.rlhf.metrics import pair_logps
from deltatune.rlhf.rewards import FunctionReward, ModelReward, load_reward_fn
from deltatune.rlhf.rollout import encode_prompts, generate_rollout
from deltatune.rlhf.scoring import completion_logprobs, sequence_logps
from tests.helpers import write_jsonl

TOPICS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "robot", "ocean", "maple", "train", "chair"]


def pair_rows(n: int, seed: int) -> list[dict]:
    """A preference a tiny model can pick up in a few steps: a calm reply beats a shouted one."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        rows.append({"prompt": f"Tell me about the {topic}.", "chosen": f"the {topic} is nice and calm",
                     "rejected": f"NO! {topic.upper()}!!! STOP!!!"})
    return rows


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (two threads on a busy 2-core machine spin and wait:
    measured 10x slower generation here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quiet(*_args) -> None:
    pass


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pairs")
    return write_jsonl(root / "train.jsonl", pair_rows(48, 0)), write_jsonl(root / "eval.jsonl", pair_rows(12, 1))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    rows = [{"prompt": f"Say something about the {t}.", "topic": t} for t in TOPICS]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", rows)


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fn") / "rewards.py"
    path.write_text(
        "def short(prompts, completions, topic=None, **_):\n"
        "    assert topic is not None and len(topic) == len(completions)\n"
        "    return [-len(c) / 20 for c in completions]\n"
        "def wrong_length(prompts, completions, **_):\n"
        "    return [0.0]\n"
    )
    return path


def config(tmp_path: Path, stage: str, *overrides: str):
    return load_config(
        None,
        [
            "model=tiny-llama",
            f"stage={stage}",
            "data.max_length=64",
            "train.batch_size=4",
            "train.lr=1e-2",
            "train.warmup=0",
            "delta.dropout=0.0",
            f"output_dir={tmp_path / stage}",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def reward_run(pair_files, tmp_path_factory) -> tuple[Path, dict]:
    train, evaluation = pair_files
    cfg = config(tmp_path_factory.mktemp("reward"), "reward", f"data.train={train}", f"data.eval={evaluation}",
                 "train.max_steps=8")
    summary = run_stage(cfg, quiet)
    return Path(cfg.output_dir), summary


# ---- reward -------------------------------------------------------------------------------------------

def test_reward_model_learns_with_a_trained_head(reward_run):
    run_dir, summary = reward_run
    assert summary["methods"] == ["lora", "head"]  # the new score head was added and trained
    base, tuned = summary["eval"]["base"], summary["eval"]["tuned"]
    assert tuned["accuracy"] == 1.0 and tuned["accuracy"] > base["accuracy"]
    assert tuned["loss"] < base["loss"]
    assert {"loss", "accuracy", "margin"} <= metrics(run_dir)[0].keys()


def test_reward_run_loads_as_a_reward_source(reward_run, pair_files):
    run_dir, summary = reward_run
    scorer = ModelReward(run_dir, torch.device("cpu"))
    records = read_records(pair_files[1])
    prompts = [to_prompt(Record({"prompt": r.fields["prompt"]}, r.source)) for r in records]
    chosen = scorer(prompts, [r.fields["chosen"] for r in records])
    rejected = scorer(prompts, [r.fields["rejected"] for r in records])
    # the loaded model scores the held-out pairs exactly as the trained one did at its last eval
    assert float((chosen - rejected).mean()) == pytest.approx(summary["eval"]["tuned"]["margin"], abs=1e-4)
    assert float(chosen.mean()) == pytest.approx(summary["eval"]["tuned"]["chosen"], abs=1e-4)


# ---- DPO ------------------------------------------------------------------------------------------------

def test_dpo_raises_held_out_preference_accuracy(pair_files, tmp_path):
    train, evaluation = pair_files
    cfg = config(tmp_path, "dpo", f"data.train={train}", f"data.eval={evaluation}", "train.max_steps=6",
                 "dpo.beta=0.5", "dpo.precompute_ref=true")
    summary = run_stage(cfg, quiet)
    base, tuned = summary["eval"]["base"], summary["eval"]["tuned"]
    assert base["accuracy"] == 0.5 and base["margin"] == 0.0  # the reference against itself
    assert tuned["accuracy"] == 1.0 and tuned["margin"] > 0.5
    assert tuned["logp_accuracy"] >= base["logp_accuracy"]
    first = metrics(Path(cfg.output_dir))[0]
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)  # step 1 starts at the reference: log 2
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= first.keys()


@pytest.mark.parametrize("loss", ["ipo", "hinge"])
def test_dpo_variants_run(pair_files, tmp_path, loss):
    train, _ = pair_files
    cfg = config(tmp_path, "dpo", f"data.train={train}", "train.max_steps=2", f"dpo.loss={loss}")
    summary = run_stage(cfg, quiet)
    assert summary["steps"] == 2 and summary["final_loss"] == summary["final_loss"]  # finite, not NaN


# ---- the reference model is the base model with the delta disabled ----------------------------------------

def trained_lora(tiny_llama):
    model, tokenizer = tiny_llama
    deltas = attach(model, LoraConfig(r=4, dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, param in deltas.named_parameters():
            param.add_(torch.randn_like(param) * 0.1)  # as if trained: B != 0
    return model.eval(), tokenizer, deltas


def test_dpo_reference_is_the_base_model(tiny_llama, pair_files):
    model, tokenizer, deltas = trained_lora(tiny_llama)
    fresh, _ = load_model("tiny-llama")
    rows, _ = load_pairs(read_records(pair_files[1])[:4], tokenizer, 64, "eval")
    from deltatune.data.preference import collate_pairs

    batch = collate_pairs(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        policy_c, _, ref_c, ref_r = pair_logps(model, deltas, batch)
        base_c, base_r = sequence_logps(fresh.eval(), batch).chunk(2)
        with deltas.disabled():
            disabled_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        base_logits = fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(disabled_logits, base_logits)
    assert torch.allclose(ref_c, base_c, atol=1e-5) and torch.allclose(ref_r, base_r, atol=1e-5)
    assert not torch.allclose(policy_c, base_c, atol=1e-3)  # the delta itself does change the model
    table = reference_logps(model, deltas, rows, 2, tokenizer.pad_token_id, torch.device("cpu"))
    assert torch.allclose(table[:, 0], base_c, atol=1e-5) and torch.allclose(table[:, 1], base_r, atol=1e-5)


def test_ppo_reference_logprobs_are_the_base_models(tiny_llama):
    model, tokenizer, deltas = trained_lora(tiny_llama)
    fresh, _ = load_model("tiny-llama")
    prompts = [to_prompt(Record({"prompt": p}, "x")) for p in ("Hi", "Tell me a long story about rivers")]
    torch.manual_seed(0)
    rollout = generate_rollout(model, tokenizer, encode_prompts(tokenizer, prompts, 64), 6)
    args = (rollout.input_ids, rollout.attention_mask, rollout.prompt_length)
    with torch.no_grad(), deltas.disabled():
        ref, _ = completion_logprobs(model, *args)
    with torch.no_grad():
        base, _ = completion_logprobs(fresh.eval(), *args)
        policy, _ = completion_logprobs(model, *args)
    assert torch.equal(ref, base)
    assert not torch.allclose(policy, base, atol=1e-3)


def test_rollout_logprobs_match_unpadded_forward_passes(tiny_llama):
    """Left padding and position ids are handled: each row scores as it would alone."""
    model, tokenizer, _ = trained_lora(tiny_llama)
    prompts = [to_prompt(Record({"prompt": p}, "x")) for p in ("Hi", "Tell me a long story about the rivers of Europe")]
    torch.manual_seed(0)
    rollout = generate_rollout(model, tokenizer, encode_prompts(tokenizer, prompts, 64), 8, temperature=0.8)
    with torch.no_grad():
        batched, _ = completion_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_length, 0.8)
        for b in range(len(rollout)):
            real = rollout.attention_mask[b].bool()
            ids = rollout.input_ids[b][real].unsqueeze(0)
            n = int(rollout.mask[b].sum())
            logits = model(input_ids=ids).logits[0, -n - 1 : -1] / 0.8
            alone = torch.log_softmax(logits, -1).gather(-1, ids[0, -n:].unsqueeze(-1)).squeeze(-1)
            assert torch.allclose(batched[b, :n], alone, atol=1e-4)


# ---- PPO and GRPO ---------------------------------------------------------------------------------------------

RL = ["train.batch_size=2", "data.eval_split=0.25", "{stage}.prompts_per_step=4", "{stage}.max_new_tokens=6",
      "{stage}.eval_prompts=2"]


def rl_config(tmp_path, stage, prompt_file, *overrides):
    return config(tmp_path, stage, f"data.train={prompt_file}", *(o.format(stage=stage) for o in RL), *overrides)


def test_ppo_with_a_reward_function(tmp_path, prompt_file, reward_file):
    cfg = rl_config(tmp_path, "ppo", prompt_file, f"ppo.reward_fn={reward_file}:short", "train.max_steps=2",
                    "ppo.kl_target=0.5", "ppo.kl_horizon=10")
    summary = run_stage(cfg, quiet)
    run_dir = Path(cfg.output_dir)
    records = metrics(run_dir)
    for key in ("reward", "kl", "kl_coef", "clip_fraction", "value_loss", "policy_loss", "length"):
        assert key in records[0]
    assert records[1]["kl_coef"] != records[0]["kl_coef"]  # the adaptive controller moved it
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # first rollout: policy == reference
    assert (run_dir / "value_head.safetensors").is_file() and (run_dir / "adapter" / "adapter_config.json").is_file()
    assert set(summary["eval"]["base"]) == {"reward", "reward_sampled", "kl", "length", "finished"}


def test_ppo_with_a_reward_model_run(tmp_path, prompt_file, reward_run, reward_file):
    cfg = rl_config(tmp_path, "ppo", prompt_file, f"ppo.reward_model={reward_run[0]}", "train.max_steps=1",
                    f"ppo.eval_reward_fn={reward_file}:short")
    summary = run_stage(cfg, quiet)
    assert summary["steps"] == 1 and "reward" in metrics(Path(cfg.output_dir))[0]
    assert {"check", "check_sampled"} <= summary["eval"]["tuned"].keys()  # the program's check, beside the RM


def test_a_configured_head_delta_is_not_added_twice(pair_files, tmp_path):
    train, _ = pair_files
    cfg = config(tmp_path, "reward", f"data.train={train}", "train.max_steps=1", "delta=head")
    assert run_stage(cfg, quiet)["methods"] == ["head"]


def test_grpo_runs_and_resumes(tmp_path, prompt_file, reward_file):
    base = [f"grpo.reward_fn={reward_file}:short", "grpo.group_size=2", "grpo.epochs=2", "train.save_every=1"]
    cfg = rl_config(tmp_path, "grpo", prompt_file, *base, "train.max_steps=1")
    run_stage(cfg, quiet)
    first = metrics(Path(cfg.output_dir))
    assert {"reward", "reward_std", "kl", "kl_k3", "clip_fraction", "loss"} <= first[0].keys()
    assert first[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    resumed = rl_config(tmp_path, "grpo", prompt_file, *base, "train.max_steps=2", "resume=true")
    summary = run_stage(resumed, quiet)
    steps = [r["step"] for r in metrics(Path(cfg.output_dir)) if "reward" in r]
    assert steps == [1, 2] and summary["steps"] == 2


# ---- reward sources ----------------------------------------------------------------------------------------------

def test_reward_fn_errors_are_clear(reward_file):
    with pytest.raises(ConfigError, match="no module named 'no_such_module_xyz'"):
        load_reward_fn("no_such_module_xyz:score")
    with pytest.raises(ConfigError, match="has no function 'nope'; it defines: short, wrong_length"):
        load_reward_fn(f"{reward_file}:nope")
    with pytest.raises(ConfigError, match="file missing.py not found"):
        load_reward_fn("missing.py:score")
    with pytest.raises(ConfigError, match="expected module:function"):
        load_reward_fn("just_a_name")
    prompts = [to_prompt(Record({"prompt": "a"}, "x")), to_prompt(Record({"prompt": "b"}, "y"))]
    with pytest.raises(TrainingError, match="returned 1 rewards for 2 completions"):
        FunctionReward(f"{reward_file}:wrong_length")(prompts, ["x", "y"])
    assert load_reward_fn("math:sqrt")(4.0) == 2.0  # an importable module:function


def test_rl_stages_need_exactly_one_reward_source(prompt_file):
    with pytest.raises(ConfigError, match="set exactly one of reward_model"):
        load_config(None, ["model=tiny-llama", "stage=grpo", f"data.train={prompt_file}"])
    with pytest.raises(ConfigError, match="set exactly one of reward_model"):
        load_config(None, ["model=tiny-llama", "stage=ppo", "ppo.reward_fn=a:b", "ppo.reward_model=runs/x"])


def test_nested_disabled_blocks_keep_the_base_model(tiny_llama):
    """evaluate_policy scores the base model inside `disabled()` and disables again for the reference."""
    model, _, deltas = trained_lora(tiny_llama)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        with deltas.disabled():
            base = model(input_ids=ids).logits
            with deltas.disabled():
                pass
            after_inner = model(input_ids=ids).logits
        tuned = model(input_ids=ids).logits
    assert torch.equal(base, after_inner) and not torch.allclose(base, tuned)
