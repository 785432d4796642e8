"""deltatune: fine-tune pretrained models with every method and every stage."""
