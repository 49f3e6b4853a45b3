"""Supervised training: SFT of a causal LM and training of a process reward model.

    training.py   the shared optimisation (AdamW, warm-up + cosine, clipping, loss log) and batches
    sft.py        masked next-token SFT of a causal LM (rows from prompt/solution JSONL)
    prm_data.py   step-labelled JSONL records and their encoding in the PRM service's layout
    prm.py        PRM training, step scores, AUC and held-out metrics, loading and saving

Imports only puremesh.contract from the project (docs/LAYOUT.md); `puremesh prm-train`
(cli/prm_train.py) is its command.
"""
