"""Base models: built-in aliases, loaders, caches."""

from deltatune.models.aliases import ALIASES, known_aliases
from deltatune.models.load import TASKS, cache_root, load_model, load_tokenizer

__all__ = ["ALIASES", "TASKS", "cache_root", "known_aliases", "load_model", "load_tokenizer"]
