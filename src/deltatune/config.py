"""The run config: typed groups, YAML loading, `key.sub=value` overrides, validation messages.

A config is YAML (or a dict) validated by pydantic models with `extra="forbid"`. Before pydantic
sees it, unknown keys are caught here with the nearest valid key named, so a typo fails before
any model loads:

    config error in cfg.yaml: data.max_lenght: unknown key; did you mean 'max_length'?

The `delta` group is one delta config or a list of them; each is validated against the config
class that its `method` registers (see `deltatune.deltas.registry`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from deltatune.deltas.base import DeltaConfig
from deltatune.errors import ConfigError, nearest

__all__ = [
    "StrictModel",
    "DataConfig",
    "TrainConfig",
    "ClassifyConfig",
    "TokensConfig",
    "MlmConfig",
    "RewardConfig",
    "DPOConfig",
    "RolloutConfig",
    "PPOConfig",
    "GRPOConfig",
    "RunConfig",
    "load_config",
    "parse_overrides",
    "config_to_yaml",
]


class StrictModel(BaseModel):
    """Base for config groups: unknown keys are errors, field docstrings are the documentation."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class DataConfig(StrictModel):
    train: str | None = None
    """Training data file (.jsonl .json .csv .parquet .txt)."""
    eval: str | None = None
    """Evaluation data file; if unset, `eval_split` of the training data is held out."""
    eval_split: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of the training data held out for evaluation when `eval` is not given."""
    format: Literal["auto", "messages", "alpaca", "text"] = "auto"
    """Record format: `messages` (OpenAI role/content or ShareGPT from/value), `alpaca`
    (instruction/input/output), `text` (raw text); `auto` detects it from the first record."""
    max_length: int = Field(512, ge=8)
    """Examples longer than this many tokens are truncated (packing rows have this length)."""
    packing: bool = False
    """Pack several short examples into each row of `max_length` (no attention across examples).
    With SDPA attention on a decoder (the default) each micro-batch then goes in as one
    padding-free row, each document attending only to itself."""
    train_on_inputs: bool = False
    """Also compute the loss on prompt (system/user) tokens, not only on assistant replies."""
    system: str | None = None
    """A system message added to conversations that have none (else the template's default)."""
    max_samples: int | None = Field(None, ge=1)
    """Read at most this many examples of each data file: a random subset drawn with `train.seed`,
    taken before `eval_split` (LLaMA-Factory's `max_samples`)."""


class TrainConfig(StrictModel):
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps to run; if unset, `epochs` decides."""
    epochs: float | None = Field(None, gt=0)
    """Passes over the training data (used when `max_steps` is unset; default 1)."""
    batch_size: int = Field(8, ge=1)
    """Examples (or packed rows) per micro-batch."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step; the loss is normalised by the tokens of all of them."""
    lr: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay (never applied to biases and norm weights)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup: float = Field(0.03, ge=0)
    """Warmup length: a fraction of the steps if < 1, else a number of steps."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value (unset: no clipping)."""
    eval_every: int = Field(0, ge=0)
    """Evaluate every this many steps (0: only at the end)."""
    save_every: int = Field(0, ge=0)
    """Write a resumable checkpoint every this many steps (0: only at the end and on interrupt)."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many of the newest checkpoints to keep."""
    log_every: int = Field(1, ge=1)
    """Write a metrics line every this many steps."""
    seed: int = 0
    """Seed for initialisation, data order and dropout."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision: `bf16` autocasts matmuls to bfloat16 (weights stay fp32); `auto` is
    bf16 on a GPU that supports it and fp32 otherwise."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; `auto` picks CUDA when available."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """With several processes (`deltatune train --nproc N`, or torchrun): `ddp` keeps a full copy of
    the model on every process and averages gradients; `fsdp` (FSDP2) shards base and delta
    parameters, gradients and optimizer state over the processes, for models that do not fit one
    device. The global batch is batch_size x grad_accum x processes. Ignored in one process."""
    dist_timeout: int = Field(600, ge=1)
    """Seconds a process waits for the others at a synchronisation point before the job fails
    (a rank that crashed or hangs then stops the whole job instead of blocking it)."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass instead of keeping
    them: activation memory drops to the block inputs plus one block, for ~30% more compute."""


# --- stage groups: settings that only one stage family reads (docs/stages.md) ---------------------


class ClassifyConfig(StrictModel):
    """Sequence classification (`stage: classify`)."""

    text_field: str = "text"
    """Record field holding the text to classify."""
    label_field: str = "label"
    """Record field holding the label: a name (`positive`) or an id (`2`)."""
    label_names: list[str] | None = None
    """The labels in id order; default: the distinct labels of the training data (sorted), or
    `0..max` when they are all ids. Give them to fix the order or to allow labels the training
    data lacks."""
    num_labels: int | None = Field(None, ge=2)
    """Number of classes; default: from `label_names` or the data."""
    class_weights: list[float] | dict[str, float] | Literal["balanced"] | None = None
    """Weights of the classes in the loss: a list in label order, a mapping label -> weight, or
    `balanced` (n_examples / (n_classes * n_class), as scikit-learn). Default: all 1."""

    @model_validator(mode="after")
    def _consistent(self) -> ClassifyConfig:
        if self.label_names is not None:
            if len(set(self.label_names)) != len(self.label_names) or len(self.label_names) < 2:
                raise ValueError("classify.label_names must hold at least 2 distinct names")
            if self.num_labels is not None and self.num_labels != len(self.label_names):
                raise ValueError(f"classify.num_labels={self.num_labels} but label_names has {len(self.label_names)} names")
        return self


class TokensConfig(StrictModel):
    """Token classification, e.g. named entities (`stage: tokens`)."""

    tokens_field: str = "tokens"
    """JSONL field holding the words of a sentence (CoNLL/BIO text files need no field names)."""
    tags_field: str = "tags"
    """JSONL field holding one tag per word (`B-person`, `I-person`, `O`, ...)."""
    label_names: list[str] | None = None
    """All tags in id order; default: the tags of the training data (`O` first, then sorted)."""


class MlmConfig(StrictModel):
    """Masked language modelling (`stage: mlm`), as BERT (Devlin et al. 2019, sec. 3.1)."""

    probability: float = Field(0.15, gt=0, lt=1)
    """Fraction of (non-special) tokens chosen as prediction targets."""
    mask_fraction: float = Field(0.8, ge=0, le=1)
    """Of the chosen tokens, the fraction replaced by the mask token."""
    random_fraction: float = Field(0.1, ge=0, le=1)
    """Of the chosen tokens, the fraction replaced by a random token (the rest stay unchanged)."""

    @model_validator(mode="after")
    def _fractions(self) -> MlmConfig:
        if self.mask_fraction + self.random_fraction > 1:
            raise ValueError("mlm.mask_fraction + mlm.random_fraction must be at most 1")
        return self
    export_model: bool = True
    """Also write the adapted encoder (deltas merged, without the MLM head) to OUTPUT_DIR/model/,
    a Hugging Face directory that a later run can name as its `model:`."""


class RewardConfig(StrictModel):
    """`stage: reward`: a scalar-head reward model trained on preference pairs (Bradley–Terry loss)."""

    center_coef: float = Field(0.0, ge=0)
    """Weight of (r_chosen + r_rejected)^2 in the loss: keeps rewards near zero mean (0: off; 0.01 is usual)."""


class DPOConfig(StrictModel):
    """`stage: dpo`: direct preference optimisation against the delta-disabled model as reference."""

    beta: float = Field(0.1, gt=0)
    """Strength of the implicit KL constraint to the reference (higher: stay closer)."""
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """`sigmoid` (DPO), `ipo` (Azar et al. 2023) or `hinge` (SLiC-HF)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Assumed fraction of flipped preference labels (conservative DPO; `sigmoid` only)."""
    precompute_ref: bool = False
    """Compute the reference log-probs of every pair once before training (one forward pass
    per pair instead of one per step)."""


class RolloutConfig(StrictModel):
    """What PPO and GRPO share: the reward source, sampling, the clipped update and the KL to the reference."""

    reward_model: str | None = None
    """Run directory of a `stage: reward` run to score completions with."""
    reward_fn: str | None = None
    """A Python reward function, `package.module:function` or `path/to/file.py:function`, called as
    fn(prompts=[...], completions=[...], **other_fields) -> list of floats."""
    prompts_per_step: int = Field(8, ge=1)
    """Prompts sampled per rollout (one training step = one rollout and its updates)."""
    max_new_tokens: int = Field(64, ge=1)
    """Most tokens generated per completion."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the rollouts (log-probs are those of this distribution)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold of the rollouts (1: off, the exact policy distribution)."""
    epochs: int = Field(1, ge=1)
    """Optimisation passes over each rollout batch (in minibatches of train.batch_size x train.grad_accum)."""
    clip: float = Field(0.2, gt=0)
    """Epsilon of the policy-ratio clip."""
    missing_eos_penalty: float = Field(0.0, ge=0)
    """Subtracted from the reward of completions that hit max_new_tokens without ending."""
    eval_prompts: int = Field(64, ge=1)
    """Most held-out prompts scored at each evaluation (greedy and sampled)."""
    eval_reward_fn: str | None = None
    """Another reward function (same form as reward_fn), only reported at evaluation as `check`:
    e.g. a program's check of the behaviour while training against a learned reward model."""

    def _check_reward_source(self, stage: str) -> None:
        if bool(self.reward_model) == bool(self.reward_fn):
            raise ValueError(f"{stage}: set exactly one of reward_model (a reward run directory) or reward_fn (module:function)")


class PPOConfig(RolloutConfig):
    """`stage: ppo`: RLHF with PPO (Ouyang et al. 2022; Schulman et al. 2017)."""

    epochs: int = Field(2, ge=1)
    """PPO epochs over each rollout batch."""
    kl_coef: float = Field(0.05, ge=0)
    """Initial weight of the per-token KL penalty to the reference (the delta-disabled model)."""
    kl_target: float | None = Field(None, gt=0)
    """Adapt kl_coef to keep the KL per completion near this value (Ziegler et al. 2019); unset: fixed."""
    kl_horizon: int = Field(10000, ge=1)
    """Completions over which the adaptive controller may change kl_coef by about e^0.2."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount factor of GAE."""
    lam: float = Field(0.95, ge=0, le=1)
    """Lambda of GAE (1: Monte-Carlo returns)."""
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the value loss in the total loss."""
    vf_clip: float = Field(0.2, gt=0)
    """How far a value prediction may move from its rollout-time value per update."""
    whiten_advantages: bool = True
    """Normalise advantages to zero mean, unit variance over each rollout batch."""


class GRPOConfig(RolloutConfig):
    """`stage: grpo`: group relative policy optimisation (Shao et al. 2024), no value model."""

    group_size: int = Field(4, ge=2)
    """Completions sampled per prompt; advantages are normalised within each group."""
    beta: float = Field(0.04, ge=0)
    """Weight of the k3 KL penalty to the reference (0: no reference pass)."""
    scale_rewards: bool = True
    """Divide advantages by the group's reward std (false: Dr. GRPO)."""
    loss_type: Literal["sequence", "token"] = "sequence"
    """Average the loss per completion then over completions (the paper), or over all tokens (DAPO)."""


class RunConfig(StrictModel):
    model: str
    """Built-in alias (`deltatune models`), a local Hugging Face directory, a .gguf file, or a hub id."""
    stage: Literal["sft", "pt", "mlm", "classify", "tokens", "reward", "dpo", "ppo", "grpo"] = "sft"
    """Training stage (objective): `pt` (causal LM on raw text), `mlm` (masked LM), `sft`,
    `classify` (sequence classification), `tokens` (token classification / NER), `reward`
    (reward model on preference pairs), `dpo`, `ppo` (RLHF), `grpo`."""
    data: DataConfig = DataConfig()
    """Where the data comes from and how it is prepared."""
    quantize: Literal["none", "nf4", "int8"] = "none"
    """Store the frozen base model's Linear weights in 4-bit NF4 (QLoRA) or int8, dequantized on
    the fly; the delta trains in full precision on top. Merging/exporting dequantizes first."""
    delta: list[SerializeAsAny[DeltaConfig]] = Field(default_factory=lambda: [{"method": "lora"}], validate_default=True)
    """The delta (method) to train: one config, or a list of them to compose."""
    train: TrainConfig = TrainConfig()
    """Optimisation and loop settings."""
    classify: ClassifyConfig = ClassifyConfig()
    """Settings of `stage: classify`."""
    tokens: TokensConfig = TokensConfig()
    """Settings of `stage: tokens`."""
    mlm: MlmConfig = MlmConfig()
    """Settings of `stage: mlm`."""
    reward: RewardConfig = RewardConfig()
    """Settings of `stage: reward`."""
    dpo: DPOConfig = DPOConfig()
    """Settings of `stage: dpo`."""
    ppo: PPOConfig = PPOConfig()
    """Settings of `stage: ppo` (reward source, rollouts, PPO update, KL control)."""
    grpo: GRPOConfig = GRPOConfig()
    """Settings of `stage: grpo` (reward source, rollouts, group size, KL weight)."""
    output_dir: str = "runs/run"
    """Run directory: adapter, checkpoints, metrics, summary, config."""
    resume: bool = False
    """Continue from the newest checkpoint in `output_dir`."""
    overwrite: bool = False
    """Replace a different run already in `output_dir` (otherwise that is an error)."""

    @model_validator(mode="after")
    def _stage_settings(self) -> RunConfig:
        if self.stage in ("ppo", "grpo"):
            getattr(self, self.stage)._check_reward_source(self.stage)
        return self

    @field_validator("delta", mode="before")
    @classmethod
    def _delta_configs(cls, value: Any) -> list[DeltaConfig]:
        from deltatune.deltas.registry import delta_config_class

        items = value if isinstance(value, list) else [value]
        if not items:
            raise ValueError("give at least one delta, e.g. delta: {method: lora}")
        configs = []
        for item in items:
            if isinstance(item, DeltaConfig):
                configs.append(item)
                continue
            if isinstance(item, str):
                item = {"method": item}
            configs.append(delta_config_class(item.get("method", "lora")).model_validate(item))
        return configs

    @model_validator(mode="after")
    def _quantized_base_stays_frozen(self) -> RunConfig:
        trains_base = [d.method for d in self.delta if d.method in ("full", "freeze")]
        if self.quantize != "none" and trains_base:
            raise ValueError(
                f"quantize: {self.quantize} stores the base weights frozen in {self.quantize}, but method "
                f"{trains_base[0]} trains them; use a delta such as lora over the quantized base (QLoRA), or quantize: none"
            )
        return self


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn `["train.lr=1e-4", "data.packing=true"]` into a nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.sub=value, e.g. train.lr=1e-4")
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is set both as a value and a group")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return tree


def _merge_item(item: Any, patch: Any) -> Any:
    """Patch one delta item; a patch that changes its `method` starts from that method's defaults
    (the old method's options would not apply: `delta.method=ia3` over a LoRA config)."""
    if not isinstance(item, dict) or not isinstance(patch, dict):
        return patch
    if "method" in patch and patch["method"] != item.get("method", "lora"):
        return copy.deepcopy(patch)
    return _merge(item, patch)


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `patch` into a copy of `base`. A dict patch on a one-item delta list edits that item;
    an integer key (`delta.1.r=4`) edits the item at that index."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        current = out.get(key)
        if isinstance(current, list) and isinstance(value, dict):
            if all(str(k).isdigit() for k in value):
                for index, sub in value.items():
                    current[int(index)] = _merge_item(current[int(index)], sub)
                continue
            if len(current) == 1 and isinstance(current[0], dict):
                out[key] = [_merge_item(current[0], value)]
                continue
        if key == "delta" and isinstance(current, dict) and isinstance(value, dict):
            out[key] = _merge_item(current, value)
            continue
        if isinstance(current, dict) and isinstance(value, dict):
            out[key] = _merge(current, value)
        else:
            out[key] = value
    return out


SYNONYMS = {
    # names users bring from PEFT, transformers, LLaMA-Factory and Axolotl -> ours
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "target",
    "lora_target": "target",
    "use_rslora": "rslora",
    "layers_to_transform": "layers",
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "warmup_ratio": "warmup",
    "warmup_steps": "warmup",
    "lr_scheduler_type": "schedule",
    "lr_scheduler": "schedule",
    "max_grad_norm": "max_grad_norm",
    "eval_steps": "eval_every",
    "save_steps": "save_every",
    "logging_steps": "log_every",
    "cutoff_len": "max_length",
    "sequence_len": "max_length",
    "max_seq_length": "max_length",
    "sample_packing": "packing",
    "dataset": "train",
    "model_name_or_path": "model",
    "base_model": "model",
    "finetuning_type": "method",
    "adapter": "method",
}


def _suggest(key: str, valid: Any) -> str | None:
    synonym = SYNONYMS.get(key)
    return synonym if synonym in valid else nearest(key, valid)


def _check_keys(raw: Any, cls: type[BaseModel], path: str) -> None:
    """Raise ConfigError for the first unknown key, naming the nearest valid one."""
    if not isinstance(raw, dict):
        return
    from deltatune.deltas.registry import delta_config_class

    for key, value in raw.items():
        where = f"{path}{key}"
        if key not in cls.model_fields:
            hint = _suggest(str(key), cls.model_fields)
            suggestion = f"; did you mean '{hint}'?" if hint else f"; valid keys: {', '.join(cls.model_fields)}"
            raise ConfigError(f"{where}: unknown key{suggestion}")
        if cls is RunConfig and key == "delta":
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if isinstance(item, dict):
                    sub = f"{where}.{i}." if isinstance(value, list) else f"{where}."
                    _check_keys(item, delta_config_class(item.get("method", "lora"), where=sub), sub)
            continue
        annotation = cls.model_fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            _check_keys(value, annotation, f"{where}.")


def _format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"] if not str(p).startswith("function-"))
        message = item["msg"]
        if item["type"] == "literal_error" and isinstance(item.get("input"), str):
            choices = [c.strip(" '") for c in str(item.get("ctx", {}).get("expected", "")).replace(" or ", ",").split(",")]
            hint = nearest(item["input"], [c for c in choices if c])
            if hint:
                message += f"; did you mean '{hint}'?"
        got = item.get("input")
        if not isinstance(got, dict | list):
            message += f" (got {got!r})"
        lines.append(f"{loc}: {message}" if loc else message)
    return "\n  ".join(lines)


def validate_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a raw config dict; every problem becomes a ConfigError naming the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    try:
        _check_keys(raw, RunConfig, "")
        return RunConfig.model_validate(raw)
    except ConfigError as exc:
        raise ConfigError(f"config error in {source}: {exc}") from None
    except ValidationError as exc:
        raise ConfigError(f"config error in {source}:\n  {_format_validation_error(exc)}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict; syntax errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    return raw


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> RunConfig:
    """Load a config: `base` dict, then the YAML file at `path`, then `key.sub=value` overrides."""
    raw = copy.deepcopy(base or {})
    if path is not None:
        raw = _merge(raw, read_yaml(path))
    if overrides:
        raw = _merge(raw, parse_overrides(overrides))
    return validate_config(raw, source=str(path) if path else "config")


def config_to_yaml(config: RunConfig) -> str:
    """The resolved config as YAML (every default spelled out)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
