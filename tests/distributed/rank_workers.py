"""What each rank runs in the distributed tests (spawned by torch.distributed's elastic launcher,
so these are plain module-level functions; each returns picklable values to the test).

The ranks are real torch.distributed (gloo) processes running the learner's own code: rank 0 is
the controller (trainer/controller.py Controller) and the others `follow` it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from puremesh.trainer import checkpoint
from puremesh.trainer.controller import Controller, build_trainable, follow, records_json
from puremesh.trainer.policy import pack
from puremesh.trainer.ranks import start_ranks
from puremesh.trainer.settings import LearnerSettings
from puremesh.trainer.update import Experience


def learner_settings(policy_dir: Path, out_dir: Path, **overrides) -> LearnerSettings:
    """Small, fast settings for a tiny policy; `overrides` are LearnerSettings fields."""
    fields = {
        "policy_path": str(policy_dir),
        "train_path": str(policy_dir / "unused.jsonl"),
        "out_dir": str(out_dir),
        "algo": {"kl_coef": 0.01},
        "optim": {"lr": 1e-3, "minibatches": 2},
        "distributed": {"collective_timeout_seconds": 60, "command_timeout_seconds": 60},
    }
    for key, value in overrides.items():
        fields[key] = {**fields.get(key, {}), **value} if isinstance(value, dict) else value
    return LearnerSettings.model_validate(fields)


def make_experience(seed: int, rows: int = 12, vocab: int = 100) -> Experience:
    """A deterministic rollout batch: prompt groups of two, random tokens, one or two steps per
    response, some solved, behaviour log-probs near the policy's."""
    g = torch.Generator().manual_seed(seed)

    def tokens(low: int, high: int) -> list[int]:
        length = int(torch.randint(low, high, (1,), generator=g))
        return torch.randint(5, vocab, (length,), generator=g).tolist()

    prompts, responses = [], []
    for _ in range(rows // 2):
        prompt = tokens(3, 9)
        prompts += [prompt, prompt]
        responses += [tokens(2, 12), tokens(2, 12)]
    sequences = pack(prompts, responses, 0)
    width = sequences.response_ids.shape[1]
    step_end_mask = torch.zeros(rows, width, dtype=torch.bool)
    for row, response in enumerate(responses):
        step_end_mask[row, len(response) - 1] = True
        step_end_mask[row, (len(response) - 1) // 2] = True
    behaviour = torch.where(sequences.response_mask, -4.6 + 0.3 * torch.randn(rows, width, generator=g), 0.0)
    return Experience(
        sequences,
        torch.arange(rows) // 2,
        torch.rand(rows, 2, generator=g) * 2 - 1,
        step_end_mask,
        torch.rand(rows, generator=g) > 0.5,
        torch.ones(rows, dtype=torch.bool),
        torch.zeros(rows),
        behaviour,
    )


def run_updates(settings_json: str, steps: int, weights_out: str, resume: str = "", checkpoint_at: int = 0):
    """`steps` updates on experience seeded by the step number, from `resume` if given, with a
    checkpoint after step `checkpoint_at`; rank 0 writes the gathered weights to `weights_out`.
    Returns what this rank saw: its records, the statistics, its generator state."""
    settings = LearnerSettings.model_validate_json(settings_json)
    ranks = start_ranks(settings.distributed, settings.device)
    try:
        if not ranks.is_controller:
            return {"records": records_json(follow(settings, ranks))}
        controller = Controller(settings, ranks)
        state = controller.load(Path(resume) if resume else None)
        first = state.step + 1 if state else 1
        stats = []
        for step in range(first, first + steps):
            stats.append(controller.update(make_experience(step), step, step, [0, step * 6]))
            if step == checkpoint_at:
                shapes = checkpoint.parameter_shapes(controller.require().model)
                controller.checkpoint(
                    checkpoint.TrainingState(step, step, {"step": step}, ranks.world, settings.dtype, shapes)
                )
        weights = dict(controller.gather())
        save_file({name: tensor.contiguous() for name, tensor in weights.items()}, weights_out)
        generator = controller.require().generator.get_state().tolist()
        controller.stop()
        return {"records": records_json(controller.records), "stats": stats, "generator": generator}
    finally:
        ranks.close()


def fail_one_rank(settings_json: str, mode: str, marker: str) -> int:
    """Run as a script under a torchrun-like environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT):
    rank 1 dies (SIGKILL) or hangs right after the policy is built; rank 0 goes on to an update,
    which must fail with one RankFailure line; rank 0 writes it to `marker` as JSON."""
    settings = LearnerSettings.model_validate_json(settings_json)
    ranks = start_ranks(settings.distributed, settings.device)
    if not ranks.is_controller:
        ranks.receive()  # LOAD
        build_trainable(settings, ranks)
        if mode == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)
        return 1
    controller = Controller(settings, ranks)
    controller.load(None)
    began = time.monotonic()
    try:
        controller.update(make_experience(1), 1, 1, [0, 6])
    except Exception as error:
        outcome = {"type": type(error).__name__, "message": str(error), "seconds": time.monotonic() - began}
        Path(marker).write_text(json.dumps(outcome))
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(fail_one_rank(*sys.argv[1:4]))
