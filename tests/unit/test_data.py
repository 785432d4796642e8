"""Data: readers, formats, chat-template label masks, truncation checks, packing, batching."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from deltatune.config import DataConfig
from deltatune.data import (
    IGNORE,
    BatchStream,
    as_rows,
    build_sft_data,
    collate,
    pack,
    read_records,
    render_chat,
    to_example,
    tokenize_conversation,
    tokenize_text,
)
from deltatune.errors import DataError
from deltatune.models import load_tokenizer
from deltatune.objectives.clm import lm_loss
from tests.helpers import chat_rows, write_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-llama")


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Capital of Peru?"},
    {"role": "assistant", "content": "Lima."},
]


# ---- readers ---------------------------------------------------------------------------------
def test_readers_cover_every_file_type(tmp_path):
    rows = [{"text": "one"}, {"text": "two"}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps({"data": rows}))
    with (tmp_path / "a.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["text"])
        writer.writeheader()
        writer.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    (tmp_path / "a.txt").write_text("one\n\n\ntwo\n")
    for suffix in ("jsonl", "json", "csv", "parquet", "txt"):
        records = read_records(tmp_path / f"a.{suffix}")
        assert [r.fields["text"] for r in records] == ["one", "two"], suffix
    assert read_records(tmp_path / "a.jsonl")[1].source.endswith("a.jsonl:2")
    assert read_records(tmp_path / "a.csv")[1].source.endswith("a.csv:3")
    assert read_records(tmp_path / "a.txt")[1].source.endswith("a.txt:4")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl:2: malformed JSON"),
        ("list.jsonl", '["not", "an", "object"]\n', r"list\.jsonl:1: expected a JSON object"),
        ("empty.jsonl", "\n\n", r"empty\.jsonl: no examples"),
        ("data.xml", "<a/>", r"unsupported file type '\.xml'"),
    ],
)
def test_reader_errors_name_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        read_records(tmp_path / name)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_records(tmp_path / "nope.jsonl")


# ---- formats ---------------------------------------------------------------------------------
def _example(fields, fmt="auto", system=None):
    from deltatune.data import Record

    return to_example(Record(fields, "f.jsonl:7"), fmt, system)


def test_formats_normalise_to_messages_or_text():
    openai = _example({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    sharegpt = _example({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]})
    pair = _example({"prompt": "a", "completion": "b"})
    assert openai.messages == sharegpt.messages == pair.messages
    alpaca = _example({"instruction": "Translate", "input": "chat", "output": "cat", "system": "S"})
    assert [m["role"] for m in alpaca.messages] == ["system", "user", "assistant"]
    assert alpaca.messages[1]["content"] == "Translate\n\nchat"
    assert _example({"text": "raw"}).text == "raw"
    assert _example({"prompt": "a", "completion": "b"}, system="Be nice").messages[0] == {"role": "system", "content": "Be nice"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"instruction": "x", "output": ""}, r"f\.jsonl:7: field 'output' is missing or empty"),
        ({"messages": [{"role": "robot", "content": "x"}]}, r"f\.jsonl:7: messages\[0\]: unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
        ({"question": "x"}, "cannot tell the data format"),
    ],
)
def test_format_errors_name_example_and_field(fields, message):
    with pytest.raises(DataError, match=message):
        _example(fields)


# ---- label masks -----------------------------------------------------------------------------
def test_labels_cover_exactly_the_assistant_replies(tokenizer):
    tok = tokenize_conversation(tokenizer, CONVERSATION, max_length=512, source="x")
    labelled = [t for t, label in zip(tok.input_ids, tok.labels, strict=True) if label != IGNORE]
    assert tok.labels == [t if label != IGNORE else IGNORE for t, label in zip(tok.input_ids, tok.labels, strict=True)]
    # both assistant turns (multi-turn), each with its end-of-turn token so the model learns to stop
    assert tokenizer.decode(labelled) == "Hello!<|im_end|>\nLima.<|im_end|>\n"
    assert tokenizer.decode(tok.input_ids) == render_chat(tokenizer, CONVERSATION)


def test_train_on_inputs_labels_everything_but_the_first_token(tokenizer):
    tok = tokenize_conversation(tokenizer, CONVERSATION, max_length=512, train_on_inputs=True)
    assert tok.labels[0] == IGNORE and tok.labels[1:] == tok.input_ids[1:]


def test_text_gets_eos_and_full_labels(tokenizer):
    tok = tokenize_text(tokenizer, "Hello world", max_length=64)
    assert tok.input_ids[-1] == tokenizer.eos_token_id and tok.labels[1:] == tok.input_ids[1:]


def test_truncation_check_reports_and_refuses(tmp_path, tokenizer):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "t.jsonl", [long_prompt, *chat_rows(3)])
    train, _, reports = build_sft_data(DataConfig(train=str(path), max_length=64), tokenizer)
    assert len(train) == 3 and reports[0].truncated == 1
    assert "dropped 1: no trainable token left after truncation to max_length=64" in "\n".join(reports[0].lines())
    write_jsonl(path, [long_prompt, long_prompt])
    with pytest.raises(DataError, match="none of the 2 examples has a token to train on"):
        build_sft_data(DataConfig(train=str(path), max_length=64), tokenizer)


def test_eval_split_is_deterministic_and_disjoint(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", chat_rows(40, seed=1))
    cfg = DataConfig(train=str(path), eval_split=0.25)
    a_train, a_eval, _ = build_sft_data(cfg, tokenizer, seed=3)
    b_train, b_eval, _ = build_sft_data(cfg, tokenizer, seed=3)
    assert (len(a_train), len(a_eval)) == (30, 10) and a_eval == b_eval and a_train == b_train


# ---- packing and batching ------------------------------------------------------------------
def test_packed_logits_equal_unpacked_per_document(tiny_llama, tokenizer):
    model, _ = tiny_llama
    model.eval()
    docs = [tokenize_conversation(tokenizer, r["messages"], 512) for r in chat_rows(6, seed=2)]
    rows = pack(docs, max_length=128)
    assert len(rows) < len(docs), "several documents should share a row"
    batch = collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        # use_cache=False as in training: transformers only builds the per-document mask without a cache
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for b, row in enumerate(rows):
            starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.position_ids)]
            for lo, hi in zip(starts, starts[1:], strict=False):
                alone = model(input_ids=torch.tensor([row.input_ids[lo:hi]])).logits[0]
                torch.testing.assert_close(packed[b, lo:hi], alone, atol=1e-5, rtol=1e-4)
        # and the training loss of the packed batch is the sum of the documents' losses
        packed_loss, packed_count = lm_loss(model, batch)
        singles = [lm_loss(model, collate(as_rows([d]), tokenizer.pad_token_id)) for d in docs]
        # padding-free: all rows as one row (documents still attend only to themselves)
        flat = collate(rows, tokenizer.pad_token_id, single_row=True)
        assert flat["input_ids"].shape[0] == 1 and int(flat["token_mask"].sum()) == int(batch["token_mask"].sum())
        flat_loss, flat_count = lm_loss(model, flat)
    torch.testing.assert_close(packed_loss, sum(loss for loss, _ in singles), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(flat_loss, packed_loss, rtol=1e-5, atol=1e-4)
    assert packed_count == flat_count == sum(count for _, count in singles)


def test_packing_keeps_every_token_and_label(tokenizer):
    docs = [tokenize_conversation(tokenizer, r["messages"], 512) for r in chat_rows(9)]
    rows = pack(docs, max_length=100)
    assert all(len(r.input_ids) <= 100 for r in rows)
    assert sorted(t for r in rows for t in r.input_ids) == sorted(t for d in docs for t in d.input_ids)
    assert sum(r.num_label_tokens for r in rows) == sum(d.num_label_tokens for d in docs)


def test_collate_pads_right_with_ignored_labels(tokenizer):
    docs = [tokenize_text(tokenizer, t, 64) for t in ["a b c d e f g", "a"]]
    batch = collate(as_rows(docs), pad_id=tokenizer.pad_token_id)
    n0, n1 = len(docs[0].input_ids), len(docs[1].input_ids)
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["attention_mask"][1].sum() == n1 and (batch["labels"][1, n1:] == IGNORE).all()
    assert batch["attention_mask"][0].sum() == n0


def test_batch_stream_is_deterministic_resumable_and_sharded(tokenizer):
    docs = [tokenize_text(tokenizer, f"text {i}", 16) for i in range(20)]
    rows = as_rows(docs)
    first = BatchStream(rows, 4, tokenizer.pad_token_id, seed=5)
    seen = [next(first)["input_ids"] for _ in range(7)]
    resumed = BatchStream(rows, 4, tokenizer.pad_token_id, seed=5)
    resumed.load_state_dict({"epoch": 1, "index": 0})
    assert torch.equal(next(resumed)["input_ids"], seen[5])
    # two ranks together see every row of an epoch exactly once
    ids = []
    for rank in range(2):
        stream = BatchStream(rows, 2, tokenizer.pad_token_id, seed=5, rank=rank, world_size=2)
        for _ in range(stream.batches_per_epoch):
            batch = next(stream)
            ids += [tuple(r[m.bool()].tolist()) for r, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    assert sorted(ids) == sorted(tuple(d.input_ids) for d in docs)
