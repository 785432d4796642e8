"""Config: typed validation with messages that name the key and the nearest valid one."""

from __future__ import annotations

import pytest

from deltatune.config import config_to_yaml, load_config, parse_overrides
from deltatune.errors import ConfigError


def _load(*overrides: str, base=None):
    return load_config(None, ["model=tiny-llama", *overrides], base=base)


def test_defaults_are_complete_and_roundtrip(tmp_path):
    cfg = _load()
    assert cfg.stage == "sft" and cfg.delta[0].method == "lora" and cfg.train.batch_size == 8
    path = tmp_path / "cfg.yaml"
    path.write_text(config_to_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.max_lenght=12", "data.max_lenght: unknown key; did you mean 'max_length'?"),
        ("trian.lr=1", "trian: unknown key; did you mean 'train'?"),
        ("delta.rank=4", "delta.rank: unknown key; did you mean 'r'?"),
        ("delta.method=lorra", "delta.method: unknown method 'lorra'; did you mean 'lora'?"),
        ("train.schedule=cosin", "did you mean 'cosine'?"),
        ("train.lr=fast", "train.lr: Input should be a valid number"),
        ("train.batch_size=0", "train.batch_size: Input should be greater than or equal to 1"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        _load(override)
    assert expected in str(info.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: tiny-llama\ntrain:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(path)


def test_overrides_parse_yaml_values_and_nest():
    assert parse_overrides(["train.lr=1e-4", "data.packing=true", "delta.target=[q_proj, v_proj]"]) == {
        "train": {"lr": "1e-4"},
        "data": {"packing": True},
        "delta": {"target": ["q_proj", "v_proj"]},
    }
    cfg = _load("train.lr=1e-4", "delta.target=[q_proj, v_proj]", "delta.r=4")
    assert cfg.train.lr == 1e-4 and cfg.delta[0].target == ["q_proj", "v_proj"] and cfg.delta[0].r == 4
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        parse_overrides(["train.lr"])


def test_delta_shorthand_and_lists():
    assert _load(base={"delta": "lora"}).delta[0].method == "lora"
    cfg = _load("delta.1.r=2", base={"delta": [{"method": "lora", "r": 8}, {"method": "lora", "r": 4}]})
    assert [d.r for d in cfg.delta] == [8, 2]
    with pytest.raises(ConfigError, match="delta.1.alpah: unknown key; did you mean 'alpha'"):
        _load(base={"delta": [{"method": "lora"}, {"method": "lora", "alpah": 3}]})


def test_missing_model_is_reported():
    with pytest.raises(ConfigError, match="model: Field required"):
        load_config(None, [])
