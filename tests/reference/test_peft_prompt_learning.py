"""PEFT as the oracle for the prompt-learning methods: prompt, ptuning (MLP, LSTM), prefix, ptuning2.

Our saved adapters load in peft with equal outputs, peft's load here with equal outputs, and greedy
generation (with the KV cache) gives the same logits at every step, on a Llama-like decoder
(CAUSAL_LM) and a BERT-like encoder (FEATURE_EXTRACTION). PEFT's prompt methods return outputs
for the virtual positions too; ours strip them, so the comparison is on the real positions.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

from deltatune.deltas import attach
from deltatune.deltas.registry import delta_config_class
from deltatune.export.peft_format import load_deltas, save_deltas


@functools.cache
def _base(family: str):
    import transformers

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  initializer_range=0.1, attn_implementation="sdpa")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if family == "llama":
            config = transformers.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0, **common)
            return transformers.LlamaForCausalLM(config).eval()
        return transformers.BertModel(transformers.BertConfig(pad_token_id=0, **common)).eval()


def _fresh(family: str):
    return copy.deepcopy(_base(family))


# Two rows, the second right-padded: masks and padding are part of what must agree.
IDS = torch.tensor([[5, 17, 42, 8, 99, 23, 7], [11, 3, 250, 64, 0, 0, 0]])
MASK = (IDS != 0).long()


def _real_outputs(model, family: str) -> torch.Tensor:
    """Outputs at the real (unpadded) positions, virtual positions dropped if the model returns them."""
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=MASK)
    h = out.logits if family == "llama" else out.last_hidden_state
    h = h[:, h.shape[1] - IDS.shape[1] :]
    return h[MASK.bool()]


def _perturb(named_parameters) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in named_parameters:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


OURS = {
    "prompt": {"method": "prompt", "num_virtual_tokens": 4},
    "ptuning-mlp": {"method": "ptuning", "num_virtual_tokens": 3, "encoder": "mlp", "encoder_hidden": 32},
    "ptuning-lstm": {"method": "ptuning", "num_virtual_tokens": 3, "encoder": "lstm", "encoder_hidden": 16},
    "prefix": {"method": "prefix", "num_virtual_tokens": 5, "projection_hidden": 32},
    "ptuning2": {"method": "ptuning2", "num_virtual_tokens": 5},
}
FAMILIES = ("llama", "bert")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(OURS))
def test_ours_loads_in_peft_with_equal_outputs(tmp_path, name, family):
    torch.manual_seed(0)
    model = _fresh(family)
    config = OURS[name]
    deltas = attach(model, delta_config_class(config["method"]).model_validate(config))
    _perturb(deltas.named_parameters())
    model.eval()
    ours = _real_outputs(model, family)
    save_deltas(deltas, tmp_path / "adapter", base_model=family)
    peft_model = PeftModel.from_pretrained(_fresh(family), tmp_path / "adapter").eval()
    torch.testing.assert_close(_real_outputs(peft_model, family), ours, atol=1e-5, rtol=1e-4)


PEFT = {
    "prompt": lambda task: PromptTuningConfig(task_type=task, num_virtual_tokens=4),
    "ptuning-mlp": lambda task: PromptEncoderConfig(task_type=task, num_virtual_tokens=3, encoder_hidden_size=32),
    "ptuning-lstm": lambda task: PromptEncoderConfig(
        task_type=task, num_virtual_tokens=3, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"
    ),
    "prefix-projection": lambda task: PrefixTuningConfig(
        task_type=task, num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=32
    ),
    "prefix": lambda task: PrefixTuningConfig(task_type=task, num_virtual_tokens=5),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(PEFT))
def test_peft_adapter_loads_here_with_equal_outputs(tmp_path, name, family):
    torch.manual_seed(0)
    task = "CAUSAL_LM" if family == "llama" else "FEATURE_EXTRACTION"
    peft_model = get_peft_model(_fresh(family), PEFT[name](task))
    _perturb((n, p) for n, p in peft_model.named_parameters() if p.requires_grad)
    peft_model.eval()
    expected = _real_outputs(peft_model, family)
    peft_model.save_pretrained(tmp_path / "adapter")
    model = _fresh(family)
    deltas = load_deltas(model, tmp_path / "adapter")
    assert deltas.num_trainable() == peft_model.get_prompt_embedding_to_save("default").numel()
    torch.testing.assert_close(_real_outputs(model.eval(), family), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["prompt", "prefix", "ptuning-lstm"])
def test_generation_matches_peft_alone_and_no_cache(tmp_path, name):
    """Greedy generation of a left-padded batch: cached steps == uncached steps == each row alone,
    and the unpadded row == PEFT. (PEFT drops generate's position ids for input prompts, so a
    left-padded row's real tokens sit k + pads after the prompt there; here, k after it, as alone.)"""
    torch.manual_seed(0)
    model = _fresh("llama")
    config = OURS[name]
    deltas = attach(model, delta_config_class(config["method"]).model_validate(config))
    _perturb(deltas.named_parameters())
    model.eval()
    ids = torch.tensor([[5, 17, 42, 8, 99], [0, 0, 11, 3, 250]])  # the second row left-padded
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    cached = model.generate(ids, attention_mask=(ids != 0).long(), **kwargs)
    steps = torch.stack(cached.logits)  # [steps, batch, vocab]
    uncached = model.generate(ids, attention_mask=(ids != 0).long(), use_cache=False, **kwargs)
    torch.testing.assert_close(torch.stack(uncached.logits), steps, atol=1e-5, rtol=1e-4)
    alone = model.generate(ids[1:, 2:], **kwargs)
    torch.testing.assert_close(torch.stack(alone.logits)[:, 0], steps[:, 1], atol=1e-5, rtol=1e-4)

    save_deltas(deltas, tmp_path / "adapter", base_model="llama")
    peft_model = PeftModel.from_pretrained(_fresh("llama"), tmp_path / "adapter").eval()
    theirs = peft_model.generate(input_ids=ids[:1], **kwargs)
    torch.testing.assert_close(torch.stack(theirs.logits)[:, 0], steps[:, 0], atol=1e-5, rtol=1e-4)
    assert torch.equal(theirs.sequences[0, -6:], cached.sequences[0, -6:])
