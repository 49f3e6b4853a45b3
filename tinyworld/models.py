"""The tiny models: a Qwen2 policy (`Qwen2ForCausalLM`) and a Qwen2 PRM
(`Qwen2ForTokenClassification`, 2 labels, 1 = "step is correct"), built randomly initialised.

Both share one size: hidden 128, 2 layers, 4 query heads and 2 key/value heads of head_dim 32
(vLLM's CPU attention needs head_dim 32 or more, and vLLM's Qwen2 takes head_dim = hidden /
heads); `model_shape` gives those proportions for any width (the bootstrap's policy_hidden). Each builder
is deterministic: the same seed gives byte-identical files, which load in transformers and vLLM.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForTokenClassification,
)

from puremesh.supervised.prm import LABELS

from .tokenizer import MAX_POSITIONS

# The tiny model size shared by policy and PRM.
HIDDEN_SIZE = 128
NUM_LAYERS = 2
HEAD_DIM = 32  # the smallest head vLLM's CPU attention takes


def model_shape(hidden: int, layers: int) -> dict[str, int]:
    """Qwen2Config fields of a model `hidden` wide and `layers` deep, in the proportions above
    (heads of HEAD_DIM, half as many key/value heads, an MLP twice as wide)."""
    heads = hidden // HEAD_DIM
    return {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "num_hidden_layers": layers,
    }


def _config(tokenizer: PreTrainedTokenizerFast, **extra: object) -> Qwen2Config:
    """The tiny Qwen2 config; `extra` overrides or adds fields (e.g. num_hidden_layers)."""
    fields: dict[str, object] = {
        "vocab_size": len(tokenizer),
        **model_shape(HIDDEN_SIZE, NUM_LAYERS),
        "max_position_embeddings": MAX_POSITIONS,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "dtype": "float32",
    }
    fields.update(extra)
    return Qwen2Config(**fields)


def build_policy(
    out_dir: str | Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0, **config: object
) -> Qwen2ForCausalLM:
    """A random tiny `Qwen2ForCausalLM`, saved (safetensors) with `tokenizer` and a generation
    config into `out_dir`; loads in transformers and in vLLM. `config` overrides Qwen2Config
    fields (keep hidden_size / num_attention_heads >= 32 for vLLM's CPU attention)."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(_config(tokenizer, **config)).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return model


def build_prm(
    out_dir: str | Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0
) -> Qwen2ForTokenClassification:
    """A random tiny `Qwen2ForTokenClassification` with 2 labels (1 = "step is correct"), saved
    with `tokenizer` into `out_dir`."""
    torch.manual_seed(seed)
    config = _config(
        tokenizer,
        num_labels=len(LABELS),
        id2label=dict(LABELS),
        label2id={v: k for k, v in LABELS.items()},
    )
    model = Qwen2ForTokenClassification(config).to(torch.float32).eval()
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return model
