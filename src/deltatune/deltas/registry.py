"""Method registry: `delta.method` name -> Delta class. Each method registers in one line below."""

from __future__ import annotations

from deltatune.deltas.adapter import Adapter
from deltatune.deltas.base import Delta, DeltaConfig
from deltatune.deltas.bitfit import Bitfit
from deltatune.deltas.diffprune import DiffPrune
from deltatune.deltas.freezing import Freeze
from deltatune.deltas.full import Full
from deltatune.deltas.ia3 import IA3
from deltatune.deltas.lora import Lora
from deltatune.deltas.prefix import Prefix
from deltatune.deltas.prompt import Prompt
from deltatune.deltas.ptuning import PTuning
from deltatune.deltas.ptuning2 import PTuning2
from deltatune.deltas.select import Head
from deltatune.errors import ConfigError, nearest

__all__ = ["METHODS", "delta_class", "delta_config_class", "delta_class_for_peft_type"]

METHODS: dict[str, type[Delta]] = {
    "lora": Lora,
    "head": Head,
    "full": Full,
    "freeze": Freeze,
    "bitfit": Bitfit,
    "ia3": IA3,
    "diffprune": DiffPrune,
    "prompt": Prompt,
    "prefix": Prefix,
    "ptuning": PTuning,
    "ptuning2": PTuning2,
    "adapter": Adapter,
}


def delta_class(method: str, where: str = "delta.") -> type[Delta]:
    """The Delta class registered for `method`; a ConfigError naming the nearest method otherwise."""
    if method not in METHODS:
        hint = nearest(str(method), METHODS)
        raise ConfigError(
            f"{where}method: unknown method {method!r}"
            + (f"; did you mean '{hint}'?" if hint else f"; one of: {', '.join(METHODS)}")
        )
    return METHODS[method]


def delta_config_class(method: str, where: str = "delta.") -> type[DeltaConfig]:
    return delta_class(method, where).config_class


def delta_class_for_peft_type(peft_type: str) -> type[Delta] | None:
    """The Delta class that reads adapters saved with this `peft_type`, if any."""
    for cls in METHODS.values():
        if (cls.peft_type or cls.config_class.model_fields["method"].default.upper()) == peft_type:
            return cls
    return None
