"""One PPO update from scored groups: old and reference log-probs, PURE credit assignment,
off-policy weights, clipped PPO over minibatches. The math lives in trainer/algo; this module
moves tensors, on the policy's device, over the ranks.

Every rank runs `ppo_update` on the same experience (rank 0 sends it, trainer/controller.py):

- The old and reference passes run with dropout off (eval mode, no grad), each rank over its
  share of the rows in micro-batches (trainer/batching.py); one all-reduce gives every rank the
  full [B, L] log-probs, so credit assignment sees the whole batch on every rank alike.
- The update runs in train mode (dropout as `algo.update_dropout` says). Each rank takes its
  share of each minibatch in micro-batches and accumulates gradients; FSDP2 averages them over
  the ranks. A micro-batch's loss is scaled by its share of the minibatch's sequences (times the
  rank count, which FSDP2's average divides out), so N ranks and any token budget compute the
  update of one rank that takes the minibatch in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch.distributed.tensor import DTensor

from .algo import (
    PureAdvantages,
    kl_estimate,
    off_policy_weights,
    ppo_loss,
    prm_vr_agreement,
    pure_advantages,
)
from .algo.options import OffPolicyCorrection
from .batching import plan
from .collector import ScoredGroup
from .policy import SequenceBatch, pack, response_logprobs
from .ranks import Ranks
from .settings import AlgoSettings, MemorySettings, OptimSettings


@dataclass
class Experience:
    """The rollout batch as tensors. B responses, L response tokens, K steps."""

    sequences: SequenceBatch
    group_index: torch.Tensor  # [B]
    step_scores: torch.Tensor  # [B, K]
    step_end_mask: torch.Tensor  # [B, L]
    solved: torch.Tensor  # [B] bool
    has_ground_truth: torch.Tensor  # [B] bool
    staleness: torch.Tensor  # [B] versions behind the learner
    behaviour_logprobs: torch.Tensor  # [B, L] the rollout's log-probs (NaN where none came back)

    def to(self, device: torch.device) -> Experience:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Experience(**{name: value.to(device) for name, value in moved.items()})

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor under one flat name (what rank 0 sends the other ranks)."""
        names = ("input_ids", "attention_mask", "response_ids", "response_mask", "positions")
        flat = dict(zip(names, self.sequences.tensors(), strict=True))
        flat.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "sequences"})
        return flat

    @classmethod
    def from_named(cls, tensors: dict[str, torch.Tensor]) -> Experience:
        names = ("input_ids", "attention_mask", "response_ids", "response_mask", "positions")
        sequences = SequenceBatch(*(tensors[name] for name in names))
        rest = {f.name: tensors[f.name] for f in fields(cls) if f.name != "sequences"}
        return cls(sequences=sequences, **rest)


def build_experience(groups: list[ScoredGroup], pad_id: int, version: int) -> Experience:
    prompts, responses, scores, ends, group_ids, solved, truth, stale, behaviour = ([] for _ in range(9))
    for g, group in enumerate(groups):
        for sample, (spans, step_scores), is_solved, with_truth in zip(
            group.samples, group.steps, group.solved, group.ground_truth, strict=True
        ):
            prompts.append(group.prompt_ids)
            responses.append(sample.token_ids)
            scores.append(step_scores)
            ends.append([end - 1 for _, end in spans])
            group_ids.append(g)
            solved.append(is_solved)
            truth.append(with_truth)  # False for a response the grader failed (failover.py)
            stale.append(version - sample.policy_version)
            behaviour.append(sample.logprobs)
    sequences = pack(prompts, responses, pad_id)
    rows, width = sequences.response_ids.shape
    step_scores = torch.zeros(rows, max(1, max(len(s) for s in scores)))
    step_end_mask = torch.zeros(rows, width, dtype=torch.bool)
    behaviour_logprobs = torch.full((rows, width), float("nan"))
    for row, (row_scores, row_ends) in enumerate(zip(scores, ends, strict=True)):
        step_scores[row, : len(row_scores)] = torch.tensor(row_scores)
        step_end_mask[row, row_ends] = True
        if len(behaviour[row]) == len(responses[row]):
            behaviour_logprobs[row, : len(responses[row])] = torch.tensor(behaviour[row])
    return Experience(
        sequences,
        torch.tensor(group_ids),
        step_scores,
        step_end_mask,
        torch.tensor(solved),
        torch.tensor(truth),
        torch.tensor(stale, dtype=torch.float32),
        behaviour_logprobs,
    )


@dataclass(frozen=True)
class UpdateSettings:
    """The settings one update reads (all ranks hold the same)."""

    algo: AlgoSettings
    optim: OptimSettings
    memory: MemorySettings


def ppo_update(
    model, reference, optimizer, experience: Experience, config: UpdateSettings, generator, ranks: Ranks
) -> dict[str, float]:
    """Credit assignment and the PPO epochs on every rank; returns the step's statistics (the
    same on every rank). `reference` is None when the KL coefficient is 0."""
    algo = config.algo
    experience = experience.to(ranks.device)
    batch, mask = experience.sequences, experience.sequences.response_mask
    budget = config.memory.micro_batch_tokens
    logp_old = logprob_pass(model, batch, ranks, budget)
    logp_ref = logprob_pass(reference, batch, ranks, budget) if reference is not None else logp_old
    kl = kl_estimate(logp_old, logp_ref, mask, algo.kl_estimator)
    credit = assign_credit(experience, kl, algo)
    weights = _token_weights(experience, logp_old, algo)
    model.train()
    targets = Targets(logp_old, credit.normalized, weights)
    optimisation = ppo_epochs(model, optimizer, batch, targets, config, generator, ranks)
    return {
        **_reward_stats(experience, credit, kl),
        **optimisation,
        **_batch_shape_stats(experience, credit),
        **_weight_stats(weights, mask, algo),
    }


def logprob_pass(model, batch: SequenceBatch, ranks: Ranks, budget: int) -> torch.Tensor:
    """[B, L] log-probs of every response token, dropout off, no grad; each rank computes its
    share of the rows and one all-reduce (the other ranks' rows are exact zeros) joins them."""
    model.eval()
    out = torch.zeros(batch.response_mask.shape, dtype=torch.float32, device=ranks.device)
    rows = torch.arange(batch.input_ids.shape[0])
    with torch.no_grad():
        for index in plan(batch.lengths.cpu(), rows, ranks.world, budget)[ranks.rank]:
            if not len(index):
                response_logprobs(model, batch.rows(rows[:1]))  # a pass the other ranks need
                continue
            part = batch.rows(index)
            out[index.to(ranks.device), : part.response_mask.shape[1]] = response_logprobs(model, part)
    return ranks.all_reduce_sum(out, "joining the log-prob passes")


def assign_credit(experience: Experience, kl: torch.Tensor, algo: AlgoSettings) -> PureAdvantages:
    """PURE credit assignment of the batch under `algo`; kl [B, L] is the per-token estimate."""
    return pure_advantages(
        experience.step_scores,
        experience.step_end_mask,
        experience.sequences.response_mask,
        experience.group_index,
        solved=experience.solved,
        has_ground_truth=experience.has_ground_truth,
        kl=kl,
        credit=algo.credit,
        temperature=algo.temperature,
        reward_mode=algo.reward_mode,
        baseline=algo.baseline,
        kl_coef=algo.kl_coef,
        vr_coef=algo.vr_coef,
        normalize=algo.normalize,
    )


def _token_weights(experience: Experience, logp_old: torch.Tensor, algo: AlgoSettings) -> torch.Tensor:
    mask = experience.sequences.response_mask
    behaviour = experience.behaviour_logprobs
    if algo.off_policy_correction is not OffPolicyCorrection.NONE and bool(behaviour[mask].isnan().any()):
        raise ValueError(
            f"off_policy_correction {algo.off_policy_correction} needs the behaviour log-probs, and a "
            "rollout replica returned samples without one per token"
        )
    return off_policy_weights(algo.off_policy_correction, logp_old, behaviour, mask, algo.tis_cap)


@dataclass(frozen=True)
class Targets:
    """What the PPO loss compares against, [B, L] each."""

    logp_old: torch.Tensor
    advantages: torch.Tensor
    weights: torch.Tensor


def ppo_epochs(
    model, optimizer, batch: SequenceBatch, targets: Targets, config: UpdateSettings, generator, ranks: Ranks
) -> dict[str, float]:
    """`optim.epochs` passes over the batch in `optim.minibatches` shuffled minibatches (the same
    order on every rank: one generator state), one clipped PPO step each. Returns the means."""
    optim = config.optim
    lengths = batch.lengths.cpu()
    records: list[torch.Tensor] = []
    for _ in range(optim.epochs):
        order = torch.randperm(lengths.shape[0], generator=generator)
        for index in order.chunk(optim.minibatches):
            passes = plan(lengths, index, ranks.world, config.memory.micro_batch_tokens)[ranks.rank]
            optimizer.zero_grad(set_to_none=True)
            sums = torch.zeros(4, dtype=torch.float64, device=ranks.device)
            for part in passes:
                sums += _accumulate(model, batch, part, targets, config.algo.clip_eps, len(index), ranks)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            optimizer.step()
            ranks.all_reduce_sum(sums, "summing the update's statistics")
            records.append(torch.cat([sums.cpu(), _full(norm).detach().double().cpu().reshape(1)]))
    loss, clipped, ratio, tokens, norm = torch.stack(records).unbind(-1)
    tokens = tokens.clamp(min=1)
    return {
        "policy_loss": float(loss.mean()),
        "clip_fraction": float((clipped / tokens).mean()),
        "ratio_mean": float((ratio / tokens).mean()),
        "grad_norm": float(norm.mean()),
    }


def _accumulate(model, batch, part, targets: Targets, clip_eps: float, rows: int, ranks: Ranks):
    """Forward and backward of one micro-batch (an empty `part` runs one row with weight 0);
    returns this pass's [loss share, clipped tokens, ratio sum, tokens]."""
    empty = not len(part)
    index = torch.arange(1) if empty else part
    micro = batch.rows(index)
    width = micro.response_mask.shape[1]
    where = index.to(ranks.device)
    logp_new = response_logprobs(model, micro)
    result = ppo_loss(
        logp_new,
        targets.logp_old[where, :width],
        targets.advantages[where, :width],
        micro.response_mask,
        clip_eps,
        targets.weights[where, :width],
    )
    share = 0.0 if empty else len(index) / rows
    (result.loss * share * ranks.world).backward()
    tokens = 0.0 if empty else float(micro.response_mask.sum())
    loss_share = float(result.loss.detach()) * share
    return torch.tensor(
        [loss_share, float(result.clip_fraction) * tokens, float(result.mean_ratio) * tokens, tokens],
        dtype=torch.float64,
        device=ranks.device,
    )


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _mean_or_nan(values: torch.Tensor) -> float:
    return float(values.float().mean()) if values.numel() else float("nan")


def _reward_stats(experience: Experience, credit: PureAdvantages, kl: torch.Tensor) -> dict[str, float]:
    """Outcome and verifiable rewards, solved share (over prompts with ground truth) and KL."""
    solved, truth = experience.solved, experience.has_ground_truth
    mask = experience.sequences.response_mask
    v = torch.where(truth, solved.float() - 1.0, 0.0)
    return {
        "outcome_reward": float(credit.outcome.mean()),
        "verifiable_reward": _mean_or_nan(v[truth]),
        "solved_ratio": _mean_or_nan(solved[truth]),
        "kl": float(kl.sum() / mask.sum().clamp(min=1)),
    }


def _batch_shape_stats(experience: Experience, credit: PureAdvantages) -> dict[str, float]:
    """Lengths (all, correct, incorrect), steps, PRM/VR agreement, staleness (the repetition of the
    texts is the loop's, trainer/algo/diagnostics.py)."""
    mask = experience.sequences.response_mask
    solved, truth = experience.solved, experience.has_ground_truth
    lengths = mask.sum(-1).float()
    return {
        "response_length_tokens": float(lengths.mean()),
        "response_length_correct_tokens": _mean_or_nan(lengths[solved & truth]),
        "response_length_incorrect_tokens": _mean_or_nan(lengths[~solved & truth]),
        "steps_per_response": float(credit.layout.num_steps.float().mean()),
        "prm_vr_agreement_ratio": float(prm_vr_agreement(credit.outcome, solved, truth)),
        "staleness_versions": float(experience.staleness.mean()),
        "responses": float(mask.shape[0]),
    }


def _weight_stats(weights: torch.Tensor, mask: torch.Tensor, algo: AlgoSettings) -> dict[str, float]:
    """Mean off-policy weight over the valid tokens (NaN without a correction)."""
    if algo.off_policy_correction is OffPolicyCorrection.NONE:
        return {"importance_weight_ratio": float("nan")}
    return {"importance_weight_ratio": float(weights[mask].mean())}
