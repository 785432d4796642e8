"""Preference pairs and prompt-only records: validation messages, chat templating, completion masks."""

from __future__ import annotations

import pytest
import torch

from deltatune.data.preference import (
    collate_pairs,
    completion_text,
    load_pairs,
    prompt_text,
    to_pair,
    to_prompt,
    tokenize_pair,
)
from deltatune.data.readers import Record, read_records
from deltatune.data.tokenize import IGNORE
from deltatune.errors import DataError
from deltatune.models import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-llama")


def rec(source: str = "pairs.jsonl:3", **fields) -> Record:
    return Record(fields, source)


def test_missing_field_names_the_example_and_field():
    with pytest.raises(DataError, match=r"pairs.jsonl:3: field 'rejected' is missing"):
        to_pair(rec(prompt="Hi", chosen="Hello"))
    with pytest.raises(DataError, match=r"pairs.jsonl:3: chosen\[0\]: unknown role 'robot'"):
        to_pair(rec(prompt="Hi", chosen=[{"role": "robot", "content": "x"}], rejected="y"))
    with pytest.raises(DataError, match=r"pairs.jsonl:3: field 'margin' must be a number"):
        to_pair(rec(prompt="Hi", chosen="a", rejected="b", margin="big"))
    with pytest.raises(DataError, match=r"pairs.jsonl:3: field 'prompt' is missing \(ppo and grpo"):
        to_prompt(rec(question="Hi"))


def test_file_errors_name_the_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: field 'rejected'"):
        [to_pair(r) for r in read_records(path)]


def test_implicit_prompt_is_the_shared_prefix():
    user = {"role": "user", "content": "Name a fruit."}
    pair = to_pair(rec(chosen=[user, {"role": "assistant", "content": "A pear."}],
                       rejected=[user, {"role": "assistant", "content": "A car."}]))
    assert pair.prompt == (user,)
    assert pair.chosen == ({"role": "assistant", "content": "A pear."},)


def test_chat_template_is_applied_and_only_completion_tokens_are_labelled(tokenizer):
    pair = to_pair(rec(prompt="Name a fruit.", chosen="A pear.", rejected="I like cars very much."))
    row = tokenize_pair(tokenizer, pair, max_length=128, index=0)
    head = prompt_text(tokenizer, pair.prompt)
    assert head.endswith("<|im_start|>assistant\n") and "Name a fruit." in head
    assert completion_text(tokenizer, pair.prompt, "A pear.") == "A pear.<|im_end|>\n"
    assert tokenizer.decode(row.prompt_ids) == head
    batch = collate_pairs([row], tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2  # chosen row, then rejected row
    for b, completion in enumerate((row.chosen_ids, row.rejected_ids)):
        labelled = batch["labels"][b][batch["labels"][b] != IGNORE].tolist()
        assert labelled == completion  # the completion (and its end-of-turn), nothing of the prompt
        assert batch["input_ids"][b, : len(row.prompt_ids)].tolist() == row.prompt_ids  # shared prompt
    assert int(batch["attention_mask"][0].sum()) == len(row.prompt_ids) + len(row.chosen_ids)


def test_message_prompt_and_string_prompt_render_the_same(tokenizer):
    as_text = tokenize_pair(tokenizer, to_pair(rec(prompt="Hi", chosen="a", rejected="b")), 64, 0)
    as_messages = tokenize_pair(
        tokenizer,
        to_pair(rec(prompt=[{"role": "user", "content": "Hi"}], chosen=[{"role": "assistant", "content": "a"}],
                    rejected=[{"role": "assistant", "content": "b"}])),
        64,
        0,
    )
    assert as_text == as_messages


def test_truncation_keeps_the_prompt_end_and_the_completion_start(tokenizer):
    pair = to_pair(rec(prompt="word " * 60, chosen="yes " * 40, rejected="no"))
    row = tokenize_pair(tokenizer, pair, max_length=48, index=0)
    assert row.truncated
    assert len(row.prompt_ids) + len(row.chosen_ids) <= 48
    assert len(row.prompt_ids) + len(row.rejected_ids) <= 48
    assert tokenizer.decode(row.prompt_ids).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(row.chosen_ids).startswith("yes yes")


def test_load_pairs_reports_and_indexes(tokenizer):
    records = [rec(f"f:{i}", prompt="Hi", chosen="a", rejected="b", margin=1) for i in range(3)]
    rows, report = load_pairs(records, tokenizer, 64, "train")
    assert [r.index for r in rows] == [0, 1, 2]
    assert report.kept == 3 and report.truncated == 0
    batch = collate_pairs(rows, tokenizer.pad_token_id)
    assert torch.equal(batch["index"], torch.tensor([0, 1, 2]))
    assert batch["margin"].tolist() == [1.0, 1.0, 1.0]


def test_prompt_records_keep_their_other_fields():
    example = to_prompt(rec(prompt="What is 2+2?", answer="4"))
    assert example.fields == {"answer": "4"}
    with pytest.raises(DataError, match="ends with an assistant message"):
        to_prompt(rec(prompt=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]))
