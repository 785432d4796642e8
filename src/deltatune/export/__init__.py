"""Export: PEFT-format adapters, merged models, GGUF."""
