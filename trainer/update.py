"""One PPO update from scored groups: old and reference log-probs, PURE credit assignment,
clipped PPO over minibatches. The math lives in trainer/algo; this module only moves tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .algo import PureAdvantages, kl_estimate, ppo_loss, prm_vr_agreement, pure_advantages, repeat_score
from .collector import ScoredGroup
from .policy import SequenceBatch, pack, response_logprobs
from .settings import AlgoSettings, OptimSettings


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


def build_experience(groups: list[ScoredGroup], pad_id: int, version: int) -> Experience:
    prompts, responses, scores, ends, group_ids, solved, truth, stale = [], [], [], [], [], [], [], []
    for g, group in enumerate(groups):
        for sample, (spans, step_scores), is_solved in zip(
            group.samples, group.steps, group.solved, strict=True
        ):
            prompts.append(group.prompt_ids)
            responses.append(sample.token_ids)
            scores.append(step_scores)
            ends.append([end - 1 for _, end in spans])
            group_ids.append(g)
            solved.append(is_solved)
            truth.append(group.has_ground_truth)
            stale.append(version - sample.policy_version)
    sequences = pack(prompts, responses, pad_id)
    width = sequences.response_ids.shape[1]
    step_scores = torch.zeros(len(responses), max(1, max(len(s) for s in scores)))
    step_end_mask = torch.zeros(len(responses), width, dtype=torch.bool)
    for row, (row_scores, row_ends) in enumerate(zip(scores, ends, strict=True)):
        step_scores[row, : len(row_scores)] = torch.tensor(row_scores)
        step_end_mask[row, row_ends] = True
    return Experience(
        sequences,
        torch.tensor(group_ids),
        step_scores,
        step_end_mask,
        torch.tensor(solved),
        torch.tensor(truth),
        torch.tensor(stale, dtype=torch.float32),
    )


def ppo_update(
    model,
    reference,
    optimizer,
    experience: Experience,
    algo: AlgoSettings,
    optim: OptimSettings,
    generator: torch.Generator,
) -> dict[str, float]:
    """Credit assignment and the PPO epochs; returns the step's statistics."""
    batch, mask = experience.sequences, experience.sequences.response_mask
    with torch.no_grad():
        logp_old = response_logprobs(model, batch)
        logp_ref = response_logprobs(reference, batch) if algo.kl_coef > 0 else logp_old
    kl = kl_estimate(logp_old, logp_ref, mask, algo.kl_estimator)
    credit = assign_credit(experience, kl, algo)
    model.train()
    optimisation = _ppo_epochs(model, optimizer, batch, logp_old, credit.normalized, algo, optim, generator)
    return {**_reward_stats(experience, credit, kl), **optimisation, **_batch_shape_stats(experience, credit)}


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


def _ppo_epochs(
    model,
    optimizer,
    batch: SequenceBatch,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    algo: AlgoSettings,
    optim: OptimSettings,
    generator: torch.Generator,
) -> dict[str, float]:
    """`optim.epochs` passes over the batch in `optim.minibatches` shuffled minibatches, one
    clipped PPO step each; logp_old and advantages are [B, L]. Returns the mean statistics."""
    losses, clip_fractions, ratios, grad_norms = [], [], [], []
    for _ in range(optim.epochs):
        order = torch.randperm(logp_old.shape[0], generator=generator)
        for index in order.chunk(optim.minibatches):
            part = batch.rows(index)
            logp_new = response_logprobs(model, part)
            result = ppo_loss(logp_new, logp_old[index], advantages[index], part.response_mask, algo.clip_eps)
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)))
            optimizer.step()
            losses.append(float(result.loss.detach()))
            clip_fractions.append(float(result.clip_fraction))
            ratios.append(float(result.mean_ratio))
    return {
        "policy_loss": sum(losses) / len(losses),
        "clip_fraction": sum(clip_fractions) / len(clip_fractions),
        "ratio_mean": sum(ratios) / len(ratios),
        "grad_norm": sum(grad_norms) / len(grad_norms),
    }


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
    """Lengths (all, correct, incorrect), steps, repetition, PRM/VR agreement, staleness."""
    batch, mask = experience.sequences, experience.sequences.response_mask
    solved, truth = experience.solved, experience.has_ground_truth
    lengths = mask.sum(-1).float()
    return {
        "response_length_tokens": float(lengths.mean()),
        "response_length_correct_tokens": _mean_or_nan(lengths[solved & truth]),
        "response_length_incorrect_tokens": _mean_or_nan(lengths[~solved & truth]),
        "steps_per_response": float(credit.layout.num_steps.float().mean()),
        "repeat_score": float(repeat_score(batch.response_ids, mask).mean()),
        "prm_vr_agreement_ratio": float(prm_vr_agreement(credit.outcome, solved, truth)),
        "staleness_versions": float(experience.staleness.mean()),
        "responses": float(mask.shape[0]),
    }
