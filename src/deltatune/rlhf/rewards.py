"""Reward sources for PPO and GRPO: a trained reward model (a `stage: reward` run) or a Python function.

A reward function is named in the config as `package.module:function` (imported; the working
directory is tried too) or `path/to/file.py:function`. It is called like a TRL reward function:

    fn(prompts=[...], completions=[...], **columns) -> list[float]

with `prompts` as in the data (strings or message lists), `completions` the generated texts, and
one list per other field of the prompt records (e.g. `answer=[...]`). Naming a function in a
config runs that code: it is code the user chose, imported the ordinary way.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import yaml

from deltatune.data.preference import PromptExample, encode_completion, encode_prompt
from deltatune.errors import ConfigError, TrainingError, UserError
from deltatune.rlhf.scoring import reward_scores

__all__ = ["RewardSource", "load_reward_fn", "FunctionReward", "ModelReward", "build_reward"]

RewardSource = Callable[[Sequence[PromptExample], Sequence[str]], torch.Tensor]
"""(prompts, completions) -> rewards [B] (fp32, CPU)."""


def _import_module(name: str, spec: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not name.startswith(exc.name):
            raise  # the module exists but one of its own imports is missing: show that error
    cwd = str(Path.cwd())
    if cwd in sys.path:
        raise ConfigError(f"reward_fn {spec!r}: no module named {name!r} (is it installed, or in the working directory?)")
    sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        raise ConfigError(
            f"reward_fn {spec!r}: no module named {name!r} (is it installed, or in the working directory?)"
        ) from None
    finally:
        sys.path.remove(cwd)


def load_reward_fn(spec: str) -> Callable[..., Sequence[float]]:
    """The function named by `module:function` or `file.py:function` (see module docstring)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"reward_fn {spec!r}: expected module:function or path/to/file.py:function")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ConfigError(f"reward_fn {spec!r}: file {path} not found (relative paths start at {Path.cwd()})")
        loader_spec = importlib.util.spec_from_file_location(f"_deltatune_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        module = _import_module(module_name, spec)
    fn = getattr(module, attr, None)
    if fn is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(f"reward_fn {spec!r}: {module_name} has no function {attr!r}; it defines: {', '.join(public) or '(none)'}")
    if not callable(fn):
        raise ConfigError(f"reward_fn {spec!r}: {attr} is a {type(fn).__name__}, not a function")
    return fn


class FunctionReward:
    """Rewards from a Python function (see module docstring)."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.fn = load_reward_fn(spec)

    def __call__(self, prompts: Sequence[PromptExample], completions: Sequence[str]) -> torch.Tensor:
        columns: dict[str, list] = {key: [] for p in prompts for key in p.fields}
        for key in columns:
            columns[key] = [p.fields.get(key) for p in prompts]
        values = self.fn(prompts=[p.prompt for p in prompts], completions=list(completions), **columns)
        try:
            rewards = [float(v) for v in values]
        except (TypeError, ValueError):
            raise TrainingError(f"reward_fn {self.spec}: must return a list of numbers, got {values!r:.200}") from None
        if len(rewards) != len(completions):
            raise TrainingError(f"reward_fn {self.spec}: returned {len(rewards)} rewards for {len(completions)} completions")
        if not all(math.isfinite(r) for r in rewards):
            raise TrainingError(f"reward_fn {self.spec}: returned a NaN or infinite reward: {rewards}")
        return torch.tensor(rewards, dtype=torch.float32)


class ModelReward:
    """Rewards from a reward model trained with `stage: reward` (its run directory)."""

    def __init__(self, run_dir: str | Path, device: torch.device, batch_size: int = 16) -> None:
        from deltatune.export.peft_format import load_deltas
        from deltatune.models import load_model

        run_dir = Path(run_dir)
        config_path, adapter = run_dir / "config.yaml", run_dir / "adapter"
        if not config_path.is_file() or not adapter.is_dir():
            raise UserError(f"reward_model {run_dir}: not a finished run directory (needs config.yaml and adapter/)")
        saved = yaml.safe_load(config_path.read_text()) or {}
        if saved.get("stage") != "reward":
            raise UserError(f"reward_model {run_dir}: that run trained stage {saved.get('stage')!r}, not a reward model")
        self.model, self.tokenizer = load_model(saved["model"], task="seq-cls", num_labels=1)
        deltas = load_deltas(self.model, adapter)
        if all(d.mergeable for d in deltas):
            deltas.merge()
        self.model.eval().to(device)
        self.system = (saved.get("data") or {}).get("system")
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, prompts: Sequence[PromptExample], completions: Sequence[str]) -> torch.Tensor:
        tok, out = self.tokenizer, []
        ids = [
            encode_prompt(tok, p.prompt, self.system) + encode_completion(tok, p.prompt, c, self.system, p.source)
            for p, c in zip(prompts, completions, strict=True)
        ]
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            width = max(len(x) for x in chunk)
            input_ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for b, x in enumerate(chunk):
                input_ids[b, : len(x)], mask[b, : len(x)] = torch.tensor(x), 1
            out.append(reward_scores(self.model, input_ids.to(self.device), mask.to(self.device)).cpu())
        return torch.cat(out)


def build_reward(reward_model: str | None, reward_fn: str | None, device: torch.device) -> RewardSource:
    """The configured reward source (exactly one of the two is set; the config checks that)."""
    if reward_fn:
        return FunctionReward(reward_fn)
    assert reward_model is not None
    return ModelReward(reward_model, device)
