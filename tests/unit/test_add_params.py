"""Behaviour of the add-parameters methods beyond the matrix: adapter maths, prompt placement with
packing, heads and generation, mixed-adapter batches, attention implementations, removal, init."""

from __future__ import annotations

import copy
import functools
import itertools

import pytest
import torch
import transformers
from torch import nn

from deltatune.deltas import attach
from deltatune.deltas.adapter import AdapterConfig
from deltatune.deltas.mixed import mixed_batch
from deltatune.deltas.prefix import PrefixConfig
from deltatune.deltas.prompt import PromptConfig
from deltatune.deltas.ptuning import PTuningConfig
from deltatune.deltas.ptuning2 import PTuning2Config
from deltatune.errors import ConfigError
from deltatune.models.packed_attention import use_packed_attention

COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              initializer_range=0.1, pad_token_id=0)


@functools.cache
def _base(cls_name: str, attn: str = "sdpa", **extra) -> nn.Module:
    cls = getattr(transformers, cls_name)
    kv = {"num_key_value_heads": 2} if "Llama" in cls_name else {}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return cls(cls.config_class(**COMMON, **kv, **extra, attn_implementation=attn)).eval()


def fresh(cls_name: str = "LlamaForCausalLM", attn: str = "sdpa", **extra) -> nn.Module:
    return copy.deepcopy(_base(cls_name, attn, **extra))


def perturb(deltas, std: float = 0.1) -> None:
    """Move a DeltaSet's or a Delta's parameters away from their initial values."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in deltas.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


IDS = torch.tensor([[5, 17, 42, 8, 99, 23, 7], [11, 3, 250, 64, 0, 0, 0]])
MASK = (IDS != 0).long()


# ---- adapters: the paper's formulas, by hand -------------------------------------------------------


def _adapter(layer, name="default"):
    down, up, act = layer.adapter_down[name], layer.adapter_up[name], layer.adapter_act[name]
    return lambda h: up(act(down(h)))


def test_sequential_adapter_is_residual_bottleneck_on_the_projection_output():
    model = fresh()
    deltas = attach(model, AdapterConfig(variant="pfeiffer", bottleneck=8, activation="gelu"))
    perturb(deltas)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        out = layer(x)
        h = layer.base_layer(x)
        torch.testing.assert_close(out, h + _adapter(layer)(h))


@pytest.mark.parametrize(
    "cls_name,feeder,out_path",
    [
        ("LlamaForCausalLM", "model.layers.1.mlp", "model.layers.1.mlp.down_proj"),
        ("BertModel", "encoder.layer.1.intermediate", "encoder.layer.1.output.dense"),
    ],
)
def test_parallel_adapter_reads_the_sublayer_input_and_is_scaled(cls_name, feeder, out_path):
    model = fresh(cls_name)
    deltas = attach(model, AdapterConfig(variant="parallel", bottleneck=8))
    assert out_path in deltas[0].paths and len(deltas[0].paths) == 2  # the MLPs only, by default
    perturb(deltas)
    layer = model.get_submodule(out_path)
    captured = {}
    model.get_submodule(feeder).register_forward_pre_hook(lambda mod, args: captured.__setitem__("x", args[0]))
    layer.register_forward_hook(lambda mod, args, out: captured.__setitem__("out", (args[0], out)))
    with torch.no_grad():
        model(input_ids=IDS, attention_mask=MASK)
        inner, out = captured["out"]
        expected = layer.base_layer(inner) + 4.0 * _adapter(layer)(captured["x"])
    torch.testing.assert_close(out, expected)


def test_adapter_wrap_points_and_errors():
    bert = fresh("BertModel")
    houlsby = attach(bert, AdapterConfig(variant="houlsby"))[0]
    assert sorted(houlsby.paths) == sorted(
        [f"encoder.layer.{i}.attention.output.dense" for i in range(2)] + [f"encoder.layer.{i}.output.dense" for i in range(2)]
    )
    only = attach(fresh(), AdapterConfig(variant="houlsby", layers=[1], target={"attention": ["o_proj"], "mlp": ["up_proj"]}))[0]
    assert only.paths == ["model.layers.1.self_attn.o_proj", "model.layers.1.mlp.up_proj"]
    with pytest.raises(ConfigError, match="output projection"):
        attach(nn.Sequential(nn.Linear(4, 4)), AdapterConfig())


# ---- prompts in the input: packing, heads ------------------------------------------------------------


def test_packed_rows_equal_each_document_alone():
    """Each document of a packed row gets its own prompt (prompt/ptuning) or sees the prefix (prefix)."""
    a, b = IDS[0], IDS[1, :4]
    packed = torch.cat([a, b])[None]
    positions = torch.cat([torch.arange(len(a)), torch.arange(len(b))])[None]
    configs = [PromptConfig(num_virtual_tokens=3), PTuningConfig(num_virtual_tokens=2, encoder="mlp"), PrefixConfig(num_virtual_tokens=3)]
    for config, packed_attention in itertools.product(configs, (False, True)):
        model = fresh()
        if packed_attention:  # as load_model sets it: document-wise SDPA under the delta
            assert use_packed_attention(model)
        perturb(attach(model, config))
        with torch.no_grad():
            together = model(input_ids=packed, position_ids=positions, use_cache=False).logits[0]
            hidden = model.model(input_ids=packed, position_ids=positions, use_cache=False).last_hidden_state
            assert hidden.shape == (1, packed.shape[1], 64)  # the backbone's output keeps the input's length
            alone_a = model(input_ids=a[None], use_cache=False).logits[0]
            alone_b = model(input_ids=b[None], use_cache=False).logits[0]
        torch.testing.assert_close(together, torch.cat([alone_a, alone_b]), atol=1e-5, rtol=1e-4)


def test_encoder_heads_read_the_real_tokens():
    """Sequence classification pools the real [CLS] (not a virtual token); token classification keeps
    one output per real token."""
    model = fresh("BertForSequenceClassification", num_labels=3)
    perturb(attach(model, PromptConfig(num_virtual_tokens=4)))
    with torch.no_grad():
        hidden = model.bert(input_ids=IDS, attention_mask=MASK).last_hidden_state
        assert hidden.shape == (2, 7, 64)
        expected = model.classifier(model.bert.pooler(hidden))
        torch.testing.assert_close(model(input_ids=IDS, attention_mask=MASK).logits, expected)

    tokens = fresh("BertForTokenClassification", num_labels=5)
    deltas = attach(tokens, [PTuning2Config(num_virtual_tokens=4, dropout=0.0), PromptConfig(num_virtual_tokens=2)])
    labels = torch.where(MASK.bool(), IDS % 5, -100)
    optimizer = torch.optim.AdamW([p for _, p in deltas.named_parameters()], lr=0.05)
    losses = []
    for _ in range(15):
        out = tokens(input_ids=IDS, attention_mask=MASK, labels=labels)
        assert out.logits.shape == (2, 7, 5)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_decoder_classifier_pools_the_last_real_token():
    model = fresh("LlamaForSequenceClassification", num_labels=2)
    perturb(attach(model, PTuningConfig(num_virtual_tokens=3, encoder="lstm", encoder_hidden=16)))
    with torch.no_grad():
        hidden = model.model(input_ids=IDS, attention_mask=MASK).last_hidden_state
        last = MASK.sum(1) - 1
        expected = model.score(hidden)[torch.arange(2), last]
        torch.testing.assert_close(model(input_ids=IDS, attention_mask=MASK).logits, expected)


# ---- prefix inside attention -------------------------------------------------------------------------


@pytest.mark.parametrize("cls_name", ["LlamaForCausalLM", "BertModel"])
def test_prefix_equal_under_sdpa_and_eager(cls_name):
    outputs = []
    for attn in ("sdpa", "eager"):
        model = fresh(cls_name, attn)
        torch.manual_seed(0)
        perturb(attach(model, PrefixConfig(num_virtual_tokens=3, projection_hidden=16)))
        assert model.config._attn_implementation == f"deltatune_prefix_{attn}"
        with torch.no_grad():
            outputs.append(model(input_ids=IDS, attention_mask=MASK)[0][MASK.bool()])
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)


def test_prefix_needs_sdpa_or_eager():
    model = fresh()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="sdpa or eager"):
        attach(model, PrefixConfig())


def test_remove_restores_the_base_model():
    model = fresh()
    with torch.no_grad():
        base = model(input_ids=IDS, attention_mask=MASK).logits
    deltas = attach(model, [PromptConfig(num_virtual_tokens=2), PrefixConfig(num_virtual_tokens=2), AdapterConfig(variant="parallel")])
    perturb(deltas)
    for delta in deltas:
        delta.remove()
    assert model.config._attn_implementation == "sdpa"
    assert not any(isinstance(m, nn.ModuleDict) for m in model.children())
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS, attention_mask=MASK).logits, base, atol=0, rtol=0)


# ---- mixed-adapter batches ------------------------------------------------------------------------------


def test_mixed_batch_rows_equal_each_example_alone():
    """One batch, rows with different prompt/prefix adapters or none: forward and greedy generation
    give each row what it gets alone with its adapter."""
    model = fresh()
    deltas = [
        *attach(model, PromptConfig(num_virtual_tokens=3), name="a"),
        *attach(model, PrefixConfig(num_virtual_tokens=4), name="b"),
        *attach(model, PTuningConfig(num_virtual_tokens=2, encoder="mlp"), name="c"),
    ]
    for delta in deltas:
        perturb(delta)
    ids = torch.tensor([[5, 17, 42, 8, 99], [0, 0, 11, 3, 250], [0, 7, 7, 9, 1], [0, 0, 0, 4, 2]])
    mask = (ids != 0).long()
    names = ["a", "b", None, "c"]
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    with mixed_batch(deltas, names), torch.no_grad():
        together = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        generated = model.generate(ids, attention_mask=mask, **kwargs)
    for row, name in enumerate(names):
        for delta in deltas:
            delta.set_enabled(delta.name == name)
        real = ids[row][mask[row].bool()][None]
        with torch.no_grad():
            alone = model(input_ids=real).logits[0]
        torch.testing.assert_close(together[row, mask[row].bool()], alone, atol=1e-5, rtol=1e-4)
        alone_generated = model.generate(real, **kwargs)
        torch.testing.assert_close(torch.stack(generated.logits)[:, row], torch.stack(alone_generated.logits)[:, 0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="not among"):
        with mixed_batch(deltas, ["a", "zzz"]):
            pass


# ---- prompt initialisation and config ---------------------------------------------------------------


def test_prompt_init_from_text_vocab_and_random(tiny_llama):
    model, tokenizer = tiny_llama
    embeddings = model.get_input_embeddings().weight
    text = attach(copy.deepcopy(model), PromptConfig(num_virtual_tokens=5, init="text", init_text="Classify the sentiment"))[0]
    ids = tokenizer("Classify the sentiment", add_special_tokens=False)["input_ids"]
    expected = embeddings[(ids * 5)[:5]]
    torch.testing.assert_close(text.prompt_embeddings(), expected)
    vocab = attach(copy.deepcopy(model), PromptConfig(num_virtual_tokens=6))[0].prompt_embeddings()
    assert all(bool((embeddings == row).all(dim=1).any()) for row in vocab)  # rows of the embedding matrix
    torch.manual_seed(0)
    random = attach(copy.deepcopy(model), PromptConfig(num_virtual_tokens=400, init="random"))[0].prompt_embeddings()
    assert abs(random.std().item() / embeddings.std().item() - 1) < 0.1


def test_prompt_config_errors():
    from deltatune.config import load_config

    with pytest.raises(ConfigError, match="init_text"):
        load_config(None, ["model=tiny-llama", "delta.method=prompt", "delta.init=text"])
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        load_config(None, ["model=tiny-llama", "delta.method=prefix", "delta.num_virtal_tokens=4"])


@pytest.mark.parametrize("config", [PrefixConfig(num_virtual_tokens=3, projection_hidden=16), PTuning2Config(num_virtual_tokens=3)])
def test_prefix_from_real_tokens_acts_as_a_hard_prompt(monkeypatch, config):
    """Li & Liang's init from real words' activations: at step 0 a decoder with the prefix computes
    what the base computes with those tokens in front of the input (at the real positions)."""
    import deltatune.deltas.prefix as prefix_module

    words = torch.tensor([7, 250, 31])
    monkeypatch.setattr(prefix_module, "init_token_ids", lambda *args: words)
    model = fresh()
    attach(model, config)
    with torch.no_grad():
        ours = model(input_ids=IDS[:1]).logits
        hard = _base("LlamaForCausalLM")(input_ids=torch.cat([words[None], IDS[:1]], dim=1)).logits[:, 3:]
    torch.testing.assert_close(ours, hard, atol=1e-5, rtol=1e-4)


# ---- through the SFT recipe: train, checkpoint, resume, save folded, load, generate ------------------


def test_prefix_sft_run_resumes_saves_folded_and_generates(tiny_config, tmp_path):
    from safetensors.torch import load_file

    from deltatune.export.peft_format import read_adapter_config
    from deltatune.inference import generate, load_for_inference
    from deltatune.recipes import run_stage
    from deltatune.train.checkpoint import latest_checkpoint

    log = lambda *_: None  # noqa: E731
    run_stage(tiny_config("delta.method=prefix", "delta.num_virtual_tokens=4", "train.max_steps=2", "train.save_every=1"), log)
    summary = run_stage(tiny_config("delta.method=prefix", "delta.num_virtual_tokens=4", "train.max_steps=3", "resume=true"), log)
    assert summary["steps"] == 3
    run_dir = tmp_path / "run"
    config = read_adapter_config(run_dir / "adapter")
    assert config["peft_type"] == "PREFIX_TUNING" and config["prefix_projection"] is True
    assert set(load_file(run_dir / "adapter" / "adapter_model.safetensors")) == {"prompt_embeddings"}

    # The folded adapter computes what the trained reparameterisation computes.
    model, tokenizer, deltas = load_for_inference(None, run_dir / "adapter")
    assert [d.config.method for d in deltas] == ["prefix"]
    trained, _ = __import__("deltatune.models", fromlist=["load_model"]).load_model("tiny-llama")
    torch.manual_seed(0)  # the recipe's seed: the same sampled init tokens, so the same fixed offset
    unfolded = attach(trained, tiny_config("delta.method=prefix", "delta.num_virtual_tokens=4").delta)
    weights = load_file(latest_checkpoint(run_dir) / "weights.safetensors")
    unfolded.load_state_dict(weights)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, trained.eval()(input_ids=IDS).logits, atol=1e-5, rtol=1e-4)
    replies = generate(model, tokenizer, ["Reverse apple", "Reverse stone"], max_new_tokens=4)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)


def test_export_from_gathered_weights_equals_own():
    """save_deltas(weights=...) (FSDP gathers full tensors) exports what the delta's own values export."""
    model = fresh()
    deltas = attach(model, [PrefixConfig(num_virtual_tokens=2, projection_hidden=8), PTuningConfig(num_virtual_tokens=2), AdapterConfig()])
    perturb(deltas)
    for delta in deltas:
        own, given = delta.export_state(), delta.export_state({k: v.clone() for k, v in delta.state_dict().items()})
        assert own.keys() == given.keys()
        for key in own:
            torch.testing.assert_close(given[key], own[key])
