"""Pretraining: tokenizer training, data sources and mixtures, the training loop, exact resume."""
