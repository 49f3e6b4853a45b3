"""The policy (and reference) as FSDP2 modules: loading, sharding, gathering the full weights.

- Sharding: `fully_shard` on every decoder layer, then on the root (embeddings, final norm and
  output layer), over all ranks (a world of one shards nothing, but runs the same code).
- Precision: the sharded parameters, their gradients and Adam's state are float32 (the master
  weights). FSDP2's MixedPrecisionPolicy casts the gathered parameters to `learner.dtype` for the
  forward and backward passes and reduces gradients in float32, so at lr 1e-6 the bf16 updates
  are not rounded away as they are on bf16 parameters. The reference is frozen and kept in the
  compute dtype.
- Loading: only rank 0 reads the checkpoint (one full copy, in its stored dtype); every rank
  builds the model on the meta device, shards it, allocates its own shards and receives them
  from rank 0 (`set_model_state_dict(..., broadcast_from_rank0=True)`), so no rank ever holds
  more than one full copy. Buffers (rotary tables) are broadcast from rank 0 too.
- Publishing: `gather_weights` casts each parameter's shard to the compute dtype and
  all-gathers it, one parameter at a time; rank 0 keeps each on the CPU, the others drop theirs
  at once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .policy import disable_dropout
from .ranks import Ranks

log = logging.getLogger(__name__)


def load_tokenizer(path: str | Path):
    """The policy's tokenizer from a LOCAL directory (no downloads)."""
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load_sharded(
    path: str | Path,
    ranks: Ranks,
    compute_dtype: torch.dtype,
    *,
    trainable: bool = True,
    dropout: bool = False,
    checkpointing: bool = False,
):
    """The causal LM at `path` (a LOCAL directory), sharded over `ranks` on `ranks.device`.

    trainable: float32 master parameters under mixed precision; otherwise frozen, stored in
    `compute_dtype`. dropout False zeroes the dropout probabilities (the modules still switch
    train/eval as usual). checkpointing: recompute each decoder layer in the backward pass.
    """
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    full = None
    if ranks.is_controller:
        full = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype="auto")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not trainable:
        model.to(compute_dtype)
        model.requires_grad_(False)
    _shard(model, ranks, compute_dtype)
    model.to_empty(device=ranks.device)
    _fill(model, full, ranks)
    del full
    if not dropout:
        disable_dropout(model)
    model.train(trainable)
    return model


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers causal LM (model.model.layers and its kin)."""
    for name in ("layers", "h", "blocks"):
        for owner in (getattr(model, "model", None), getattr(model, "transformer", None), model):
            layers = getattr(owner, name, None) if owner is not None else None
            if isinstance(layers, torch.nn.ModuleList) and len(layers):
                return list(layers)
    raise ValueError(f"{type(model).__name__}: no decoder layers found to shard")


def _shard(model, ranks: Ranks, compute_dtype: torch.dtype) -> None:
    mesh = init_device_mesh(ranks.device.type, (ranks.world,))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def _fill(model, full, ranks: Ranks) -> None:
    """Rank 0's full weights into every rank's shards; rank 0's buffers into every rank's."""
    state = {} if full is None else full.state_dict()
    with ranks.guard("distributing the policy's weights"):
        set_model_state_dict(
            model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        )
        sources = dict(full.named_buffers()) if full is not None else {}
        for name, buffer in model.named_buffers():
            if ranks.is_controller:
                buffer.copy_(sources[name])
            if ranks.world > 1:
                dist.broadcast(buffer, src=0)


def gather_weights(model, dtype: torch.dtype, ranks: Ranks) -> list[tuple[str, torch.Tensor]]:
    """The full weights under their checkpoint names, in `dtype` on the CPU: on rank 0; [] on
    the others. Collective: every rank calls it, in the same order of parameters."""
    gathered: list[tuple[str, torch.Tensor]] = []
    with ranks.guard("gathering the weights to publish"), torch.no_grad():
        for name, parameter in model.named_parameters():
            tensor = parameter.detach().to(dtype)  # cast the shard first: half the traffic in bf16
            if isinstance(tensor, DTensor):
                tensor = tensor.full_tensor()
            if ranks.is_controller:
                gathered.append((name, tensor.to("cpu", copy=True)))  # never the live parameter
            del tensor
    return gathered


def local_numel(model) -> int:
    """Elements of the parameters this rank holds (its shards)."""
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
