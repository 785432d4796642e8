"""Data: readers, formats, chat templates and label masks, packing, batching, checks."""

from deltatune.data.collate import Row, as_rows, collate, pack
from deltatune.data.dataset import DataReport, build_sft_data, load_examples, tokenize_examples
from deltatune.data.formats import Example, to_example
from deltatune.data.loader import BatchStream, eval_batches
from deltatune.data.readers import Record, read_records
from deltatune.data.tokenize import IGNORE, Tokenized, render_chat, tokenize_conversation, tokenize_text

__all__ = [
    "IGNORE",
    "BatchStream",
    "DataReport",
    "Example",
    "Record",
    "Row",
    "Tokenized",
    "as_rows",
    "build_sft_data",
    "collate",
    "eval_batches",
    "load_examples",
    "pack",
    "read_records",
    "render_chat",
    "to_example",
    "tokenize_conversation",
    "tokenize_examples",
    "tokenize_text",
]
