"""The tiny world: a synthetic task, tokenizer, policy and PRM built offline for the demo and tests."""
