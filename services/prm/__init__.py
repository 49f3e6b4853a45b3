"""The PRM service: scores the reasoning steps of responses with a process reward model.

layout.py   pure step splitting and the PRM input layout (stdlib only; pure-algorithm.md 1-2)
scorer.py   the adapter that holds the PRM weights (transformers) and runs forward passes
batcher.py  dynamic batching: coalesces concurrent requests into few forward passes
"""
