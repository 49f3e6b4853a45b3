"""The PPO update on a tiny policy in a world of one rank (trainer/update.py): micro-batching
with accumulation equals one pass, activation checkpointing changes nothing, the old and
reference passes run without dropout (the first ratio is 1), bf16 compute keeps the updates of
lr 1e-6 that bf16 parameters lose, off-policy weights reach the loss, and every tensor lives on
the model's device. The same update over 2 ranks is tests/distributed/."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from puremesh.tinyworld.models import build_policy
from puremesh.trainer.controller import build_trainable
from puremesh.trainer.policy import pack, response_logprobs
from puremesh.trainer.ranks import start_ranks
from puremesh.trainer.settings import LearnerSettings
from puremesh.trainer.sharding import gather_weights
from puremesh.trainer.update import Experience, UpdateSettings, logprob_pass, ppo_update


def experience(seed: int = 0, rows: int = 8, behaviour_shift: float = 0.0) -> Experience:
    """Prompt groups of two with random tokens, two steps per response."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for _ in range(rows // 2):
        prompt = torch.randint(5, 90, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        for _ in range(2):
            prompts.append(prompt)
            length = int(torch.randint(2, 12, (1,), generator=g))
            responses.append(torch.randint(5, 90, (length,), generator=g).tolist())
    sequences = pack(prompts, responses, 0)
    ends = torch.zeros(sequences.response_mask.shape, dtype=torch.bool)
    for row, response in enumerate(responses):
        ends[row, [(len(response) - 1) // 2, len(response) - 1]] = True
    return Experience(
        sequences,
        torch.arange(rows) // 2,
        torch.rand(rows, 2, generator=g) * 2 - 1,
        ends,
        torch.rand(rows, generator=g) > 0.5,
        torch.ones(rows, dtype=torch.bool),
        torch.zeros(rows),
        torch.full(sequences.response_mask.shape, behaviour_shift),
    )


@pytest.fixture
def ranks():
    ranks = start_ranks(LearnerSettings.model_fields["distributed"].default, "cpu")
    yield ranks
    ranks.close()


def settings(policy, tmp_path, **fields) -> LearnerSettings:
    base = {"policy_path": str(policy), "train_path": "unused", "out_dir": str(tmp_path)}
    base.setdefault("optim", {"lr": 1e-3, "minibatches": 2})
    return LearnerSettings.model_validate({**base, **fields})


def updated_weights(config: LearnerSettings, ranks, batch: Experience, steps: int = 1, sgd: bool = False):
    """The weights after `steps` updates on `batch`; with `sgd`, plain SGD instead of Adam, so the
    change is the (clipped) gradient itself and comparisons see gradient differences unscaled."""
    trainable = build_trainable(config, ranks)
    if sgd:
        trainable.optimizer = torch.optim.SGD(trainable.model.parameters(), lr=config.optim.lr)
    update = UpdateSettings(config.algo, config.optim, config.memory)
    stats = [
        ppo_update(
            trainable.model,
            trainable.reference,
            trainable.optimizer,
            batch,
            update,
            trainable.generator,
            ranks,
        )
        for _ in range(steps)
    ]
    return dict(gather_weights(trainable.model, torch.float32, ranks)), stats


def initial_weights(config: LearnerSettings, ranks):
    return dict(gather_weights(build_trainable(config, ranks).model, torch.float32, ranks))


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def test_micro_batches_with_accumulation_equal_one_pass(tiny_policy_dir, tmp_path, ranks) -> None:
    batch = experience()
    whole, whole_stats = updated_weights(settings(tiny_policy_dir, tmp_path), ranks, batch, sgd=True)
    small = settings(tiny_policy_dir, tmp_path, memory={"micro_batch_tokens": 20})
    cut, cut_stats = updated_weights(small, ranks, batch, sgd=True)
    start = initial_weights(small, ranks)
    moved = max_difference(whole, start)
    assert moved > 1e-5, "the update should move the weights"
    assert max_difference(whole, cut) < 1e-4 * moved
    for key in ("policy_loss", "clip_fraction", "ratio_mean", "grad_norm", "kl", "outcome_reward"):
        assert whole_stats[0][key] == pytest.approx(cut_stats[0][key], rel=1e-4, abs=1e-6), key


def test_activation_checkpointing_changes_nothing(tiny_policy_dir, tmp_path, ranks) -> None:
    batch = experience(1)
    plain, _ = updated_weights(settings(tiny_policy_dir, tmp_path), ranks, batch, sgd=True)
    config = settings(tiny_policy_dir, tmp_path, memory={"activation_checkpointing": True})
    checkpointed, _ = updated_weights(config, ranks, batch, sgd=True)
    assert max_difference(plain, checkpointed) < 1e-8


def test_old_log_probs_run_without_dropout_so_the_first_ratio_is_one(
    tiny_tokenizer_dir, tmp_path, ranks
) -> None:
    policy = tmp_path / "dropout-policy"
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir), local_files_only=True)
    build_policy(policy, tokenizer, seed=0, attention_dropout=0.5)
    batch = experience(2)
    config = settings(policy, tmp_path, optim={"lr": 1e-3, "minibatches": 1})
    # the model really has dropout: in train mode two passes disagree
    noisy = build_trainable(settings(policy, tmp_path, algo={"update_dropout": True}), ranks)
    noisy.model.train()
    with torch.no_grad():
        first, second = (response_logprobs(noisy.model, batch.sequences) for _ in range(2))
    assert float((first - second).abs().max()) > 1e-3
    # the old-log-prob pass is deterministic even with the update's dropout on
    passes = [logprob_pass(noisy.model, batch.sequences, ranks, 1 << 14) for _ in range(2)]
    assert torch.equal(passes[0], passes[1])
    _, stats = updated_weights(config, ranks, batch)  # update_dropout off (the default)
    assert stats[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert stats[0]["clip_fraction"] == 0.0


def test_bf16_compute_keeps_the_updates_of_lr_1e_6(tiny_policy_dir, tmp_path, ranks) -> None:
    batch = experience(3)
    optim = {"lr": 1e-6, "minibatches": 2}
    start = initial_weights(settings(tiny_policy_dir, tmp_path), ranks)
    full, _ = updated_weights(settings(tiny_policy_dir, tmp_path, optim=optim), ranks, batch, steps=3)
    half, _ = updated_weights(
        settings(tiny_policy_dir, tmp_path, optim=optim, dtype="bfloat16"), ranks, batch, steps=3
    )
    delta_full = torch.cat([(full[n] - start[n]).flatten() for n in start])
    delta_half = torch.cat([(half[n] - start[n]).flatten() for n in start])
    changed_full = float((delta_full != 0).float().mean())
    changed_half = float((delta_half != 0).float().mean())
    assert changed_full > 0.9 and changed_half > 0.9 * changed_full
    cosine = torch.nn.functional.cosine_similarity(delta_full, delta_half, dim=0)
    assert float(cosine) > 0.9
    assert float(delta_half.norm() / delta_full.norm()) == pytest.approx(1.0, abs=0.15)
    # what fp32 master weights prevent: the same steps applied to bf16 parameters round away
    rounded = torch.cat([(start[n] + (full[n] - start[n])).bfloat16().float().flatten() for n in start])
    lost = float(
        ((rounded - torch.cat([start[n].bfloat16().float().flatten() for n in start])) == 0).float().mean()
    )
    assert lost > 0.5


def test_off_policy_weights_reach_the_update(tiny_policy_dir, tmp_path, ranks) -> None:
    config = settings(tiny_policy_dir, tmp_path, algo={"off_policy_correction": "tis", "tis_cap": 2.0})
    trainable = build_trainable(config, ranks)
    batch = experience(4)
    old = logprob_pass(trainable.model, batch.sequences, ranks, 1 << 14)
    mask = batch.sequences.response_mask
    # behaviour twice as likely as pi_old on every token: weight 0.5
    batch.behaviour_logprobs = torch.where(mask, old + torch.log(torch.tensor(2.0)), 0.0)
    update = UpdateSettings(config.algo, config.optim, config.memory)
    stats = ppo_update(trainable.model, None, trainable.optimizer, batch, update, trainable.generator, ranks)
    assert stats["importance_weight_ratio"] == pytest.approx(0.5, rel=1e-4)
    batch.behaviour_logprobs = torch.full(mask.shape, float("nan"))
    with pytest.raises(ValueError, match="needs the behaviour log-probs"):
        ppo_update(trainable.model, None, trainable.optimizer, batch, update, trainable.generator, ranks)


def test_logits_are_computed_for_response_positions_only(tiny_policy_dir, tmp_path, ranks) -> None:
    trainable = build_trainable(settings(tiny_policy_dir, tmp_path), ranks)
    batch = experience(5).sequences
    shapes = []
    trainable.model.lm_head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    trainable.model.eval()
    with torch.no_grad():
        kept = response_logprobs(trainable.model, batch)
        full = trainable.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    columns = int(batch.positions[batch.response_mask].max() - batch.positions[batch.response_mask].min()) + 1
    assert shapes[0][1] == columns < batch.input_ids.shape[1]
    reference = torch.log_softmax(full, -1).gather(
        1, batch.positions.unsqueeze(-1).expand(-1, -1, full.shape[-1])
    )
    reference = (
        reference.gather(-1, batch.response_ids.unsqueeze(-1))
        .squeeze(-1)
        .masked_fill(~batch.response_mask, 0)
    )
    assert torch.allclose(kept, reference, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_update_runs_on_cuda_in_bf16(tiny_policy_dir, tmp_path) -> None:
    config = settings(tiny_policy_dir, tmp_path, device="cuda", dtype="bfloat16")
    ranks = start_ranks(config.distributed, config.device)
    try:
        trainable = build_trainable(config, ranks)
        assert all(p.device.type == "cuda" for p in trainable.model.parameters())
        update = UpdateSettings(config.algo, config.optim, config.memory)
        stats = ppo_update(
            trainable.model, trainable.reference, trainable.optimizer, experience(6), update,
            trainable.generator, ranks,
        )  # fmt: skip
        assert stats["grad_norm"] > 0
    finally:
        ranks.close()
