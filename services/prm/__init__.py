"""The PRM service: scores the reasoning steps of responses with a process reward model.

step splitting and the PRM input layout are the contract's (contract/steps.py, pure)
scorer.py   the adapter that holds the PRM weights (transformers) and runs forward passes
batcher.py  dynamic batching: coalesces concurrent requests into few forward passes
"""
