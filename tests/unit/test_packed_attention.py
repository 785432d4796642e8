"""Document-wise attention for packed rows (models/packed_attention.py) against transformers'
own masked SDPA: the same outputs and gradients, and the SDPA path untouched elsewhere."""

from __future__ import annotations

import json

import torch

from deltatune.data.collate import Row, collate
from deltatune.models import load_model
from deltatune.models.packed_attention import PACKED_SDPA, document_spans


def _packed_batch(pad_id: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(5, 1000, (n,), generator=g).tolist() for n in (7, 12, 3, 9, 16)]
    rows = [
        Row(docs[0] + docs[1] + docs[2], docs[0] + docs[1] + docs[2], [*range(7), *range(12), *range(3)]),
        Row(docs[3] + docs[4], docs[3] + docs[4], [*range(9), *range(16)]),
    ]
    return collate(rows, pad_id)  # row 0 is padded to 32: its padding is a fourth document


def test_document_spans_split_at_restarts_and_skip_unpacked_rows():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    assert document_spans(positions) == [[(0, 3), (3, 5), (5, 6)], [(0, 4), (4, 6)]]
    assert document_spans(torch.arange(6).unsqueeze(0)) is None


def test_packed_attention_equals_the_masked_sdpa_in_outputs_and_gradients():
    model, tokenizer = load_model("tiny-llama")
    assert model.config._attn_implementation == PACKED_SDPA
    batch = _packed_batch(tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    results = {}
    for implementation in (PACKED_SDPA, "sdpa"):  # "sdpa": transformers' block-diagonal mask
        model.config._attn_implementation = implementation
        model.zero_grad()
        logits = model(**inputs).logits
        (logits * torch.linspace(-1, 1, logits.shape[-1]))[batch["token_mask"].bool()].sum().backward()
        results[implementation] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (packed, packed_grads), (masked, masked_grads) = results[PACKED_SDPA], results["sdpa"]
    real = batch["token_mask"].bool()
    torch.testing.assert_close(packed[real], masked[real], atol=1e-5, rtol=1e-4)
    for name, grad in packed_grads.items():
        scale = masked_grads[name].abs().max()  # gradients reach ~1e3 here: compare relative to that
        torch.testing.assert_close(grad / scale, masked_grads[name] / scale, atol=1e-6, rtol=1e-4, msg=name)


def test_generation_and_padded_batches_use_the_plain_sdpa_path(tmp_path):
    model, tokenizer = load_model("tiny-llama")
    model.eval()
    prompts = tokenizer(["hello there", "a longer prompt than the first one"], return_tensors="pt", padding=True, padding_side="left")
    outputs = {}
    for implementation in (PACKED_SDPA, "sdpa"):
        model.config._attn_implementation = implementation
        with torch.no_grad():
            outputs[implementation] = model.generate(**prompts, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            padded = model(**prompts).logits
        outputs[implementation + " padded"] = padded[prompts["attention_mask"].bool()]
    assert torch.equal(outputs[PACKED_SDPA], outputs["sdpa"])
    torch.testing.assert_close(outputs[PACKED_SDPA + " padded"], outputs["sdpa padded"])
    model.config._attn_implementation = PACKED_SDPA
    model.save_pretrained(tmp_path)  # a saved model must load anywhere: no deltatune name in it
    assert PACKED_SDPA not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
