"""Supervised training: SFT of a causal LM and training of a process reward model."""
