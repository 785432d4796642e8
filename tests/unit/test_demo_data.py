"""The demo's checked-in data is what its script writes, and the held-out prompts are really held out."""

from __future__ import annotations

import json

from deltatune.demo import DATA_DIR
from deltatune.demo.dataset import build_splits, reply, score_reply


def test_checked_in_files_match_the_generator():
    for name, rows in build_splits().items():
        on_disk = [json.loads(line) for line in (DATA_DIR / f"{name}.jsonl").read_text().splitlines()]
        assert on_disk == rows, f"{name}.jsonl differs from `python -m deltatune.demo.dataset`"


def test_heldout_prompts_never_appear_in_training():
    splits = build_splits()
    seen = {row["messages"][0]["content"] for name in ("train", "eval") for row in splits[name]}
    heldout = [row["prompt"] for row in splits["heldout"]]
    assert heldout and not seen & set(heldout)
    train_questions = {row["messages"][0]["content"] for row in splits["train"]}
    assert not train_questions & {row["messages"][0]["content"] for row in splits["eval"]}


def test_score_reply():
    assert score_reply(reply("Lima", "geography"), "geography", "lima") == {"format": True, "answer": True}
    assert score_reply(reply("Quito", "geography"), "geography", "Lima") == {"format": True, "answer": False}
    assert score_reply(reply("Lima", "science"), "geography", "Lima")["format"] is False
    assert score_reply('{"answer": "Lima"}', "geography", "Lima")["format"] is False
    assert score_reply("The capital of Peru is Lima.", "geography", "Lima") == {"format": False, "answer": False}
