"""GRPO core: group-normalized advantages, the token-level clipped surrogate, the k3 KL estimator, loss aggregation.

Pure tensor functions (no model, no trainer state), so a distributed trainer can all-gather rewards and group ids,
call :func:`group_advantages` on the global batch and keep its own slice, and so other RL frameworks can reuse them.

Conventions
    * A *group* is the set of rollouts whose rewards are compared with each other: the G grounding rollouts of one
      prompt, or the G x G' token-sparse rollouts of one prompt (ViToS). Groups are given as integer ids, so groups
      may have different sizes (e.g. after a bad rollout was dropped) and may be spread over ranks.
    * Per-token tensors are [N, C] (N rollouts, C completion positions, right-padded); ``mask`` marks real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "ADVANTAGE_SCALES",
    "LOSS_AGGREGATIONS",
    "GroupStats",
    "LossStats",
    "group_advantages",
    "group_statistics",
    "informative_groups",
    "k3_kl",
    "aggregate_token_loss",
    "clipped_surrogate_loss",
]

ADVANTAGE_SCALES = ("group", "batch", "none")
# token-mean: every completion token of the batch weighs the same (DAPO; TRL "dapo"/"bnpo", verl "token-mean")
# seq-mean-token-mean: mean over each sequence's tokens, then over sequences (original GRPO; TRL "grpo")
# seq-mean-token-sum-norm: token sum / max completion length, mean over sequences (Dr. GRPO; TRL "dr_grpo")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class GroupStats:
    """Per-rollout statistics of its group: mean [N], std [N] (unbiased; 0 for groups of one), size [N] (int64)."""

    mean: torch.Tensor
    std: torch.Tensor
    size: torch.Tensor


def _check_rewards(rewards: torch.Tensor, group_ids: torch.Tensor) -> None:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a 1-D float tensor [N], got {getattr(rewards, 'shape', type(rewards))}")
    if not isinstance(group_ids, torch.Tensor) or group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids must be an integer tensor shaped like rewards {tuple(rewards.shape)}, "
                         f"got {getattr(group_ids, 'shape', type(group_ids))}")
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")


def group_statistics(rewards: torch.Tensor, group_ids: torch.Tensor) -> GroupStats:
    """Mean, unbiased std and size of each rollout's group, without a Python loop over groups.

    Args:
        rewards: float [N].
        group_ids: int [N]; rollouts with equal ids form a group (any integers, any order).

    Returns:
        :class:`GroupStats`, every field [N] aligned with ``rewards`` (float64 math, cast back to rewards.dtype).
    """
    _check_rewards(rewards, group_ids)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    values = rewards.to(torch.float64)
    size = torch.zeros(num_groups, dtype=torch.float64, device=rewards.device).index_add_(0, inverse,
                                                                                          torch.ones_like(values))
    total = torch.zeros_like(size).index_add_(0, inverse, values)
    mean = total / size
    squares = torch.zeros_like(size).index_add_(0, inverse, (values - mean[inverse]) ** 2)
    var = torch.where(size > 1, squares / (size - 1).clamp_min(1), torch.zeros_like(size))
    return GroupStats(mean=mean[inverse].to(rewards.dtype), std=var.sqrt()[inverse].to(rewards.dtype),
                      size=size[inverse].to(torch.int64))


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, scale: str = "group", epsilon: float = 1e-6
) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean, optionally divided by a standard deviation.

        A_k = (r_k - mean_{g(k)}) / (std + epsilon)

    Args:
        rewards: float [N], one scalar reward per rollout (the weighted sum of the reward terms).
        group_ids: int [N], the group of each rollout (the prompt index for the grounding branch; for the sparse
            branch also the prompt index, so that all G x G' sparse rollouts of a prompt form one group).
        scale: "group" (std of the rollout's group, as GRPO/verl/TRL's default), "batch" (std of all N rewards,
            as in Dr. GRPO-style "batch" scaling) or "none" (mean-centering only).
        epsilon: added to the std (keeps a zero-variance group at advantage 0 instead of NaN).

    Returns:
        float [N] (rewards.dtype). A group of one rollout gets advantage 0 (it has no baseline to compare with).
        Standard deviations are unbiased (torch.std's default), as in verl and TRL.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    stats = group_statistics(rewards, group_ids)
    centered = torch.where(stats.size > 1, rewards - stats.mean, torch.zeros_like(rewards))
    if scale == "none":
        return centered
    if scale == "group":
        std = stats.std
    else:
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    return centered / (std + epsilon)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which groups of consecutive rollouts have rewards that are not all equal (DAPO's dynamic-sampling filter).

    A group whose rollouts all got the same reward has zero advantage in every row, so it adds no gradient, only
    tokens to the loss's denominator.

    Args:
        rewards: float [N], rows group-major (group g owns rows g * group_size .. g * group_size + group_size - 1).
        group_size: rows per group, N divisible by it.

    Returns:
        bool [N / group_size].
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a 1-D float tensor [N], got {getattr(rewards, 'shape', type(rewards))}")
    if not isinstance(group_size, int) or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"group_size must be a positive int dividing N={rewards.numel()}, got {group_size!r}")
    grouped = rewards.view(-1, group_size)
    return grouped.amax(1) > grouped.amin(1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) (Schulman's unbiased, non-negative estimator).

        kl = exp(ref - logp) - (ref - logp) - 1

    Args:
        logprobs, ref_logprobs: float [N, C], log-probabilities of the sampled tokens under the policy and under the
            frozen reference.

    Returns:
        float [N, C], >= 0.
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"ref_logprobs must have the shape of logprobs {tuple(logprobs.shape)}, "
                         f"got {tuple(ref_logprobs.shape)}")
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1.0


def aggregate_token_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    normalizer: float | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss [N, C] to a scalar over the masked completion tokens.

    Args:
        per_token: float [N, C].
        mask: [N, C] bool or 0/1 float, real completion tokens.
        mode: one of :data:`LOSS_AGGREGATIONS` (see the module constants for what each means).
        normalizer: the denominator to use instead of this batch's own, for gradient accumulation over micro-batches
            or ranks: the *global* token count for "token-mean", the global number of sequences for the two
            "seq-mean" modes.
            or give ``max_length``.
        max_length: the per-sequence token normaliser of "seq-mean-token-sum-norm" (Dr. GRPO divides by the
            generation budget, max_new_tokens); default C.

    Returns:
        float scalar. An all-masked batch gives 0 (never NaN).
    """
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"mode must be one of {LOSS_AGGREGATIONS}, got {mode!r}")
    if per_token.shape != mask.shape:
        raise ValueError(f"mask must have the shape of the per-token loss {tuple(per_token.shape)}, "
                         f"got {tuple(mask.shape)}")
    weights = mask.to(per_token.dtype)
    if mode == "token-mean":
        denominator = normalizer if normalizer is not None else weights.sum().clamp_min(1.0)
        return (per_token * weights).sum() / denominator
    if mode == "seq-mean-token-mean":
        per_sequence = (per_token * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)
    else:
        length = max_length if max_length is not None else per_token.shape[-1]
        per_sequence = (per_token * weights).sum(-1) / max(length, 1)
    denominator = normalizer if normalizer is not None else max(per_token.shape[0], 1)
    return per_sequence.sum() / denominator


@dataclass(frozen=True)
class LossStats:
    """Detached diagnostics of one surrogate-loss evaluation (means over masked tokens)."""

    clip_low_fraction: float  # tokens with A < 0 whose ratio fell below 1 - epsilon_low (clipped)
    clip_high_fraction: float  # tokens with A > 0 whose ratio rose above 1 + epsilon_high (clipped)
    ratio_mean: float
    kl_mean: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """The stats as a flat dict, keys prefixed (e.g. "grounding/")."""
        return {f"{prefix}{key}": value for key, value in self.__dict__.items()}


def clipped_surrogate_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    aggregation: str = "token-mean",
    normalizer: float | None = None,
    max_length: int | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """GRPO's token-level clipped objective, as a loss to minimize.

        ratio_t   = exp(logp_t - old_logp_t)
        loss_t    = -min(ratio_t * A, clip(ratio_t, 1 - epsilon_low, 1 + epsilon_high) * A) + beta * k3_t
        loss      = aggregate(loss_t over the masked tokens)

    Args:
        logprobs: float [N, C], log-probabilities of the sampled tokens under the current policy (with grad).
        old_logprobs: float [N, C], the same under the policy that generated the rollouts (no grad).
        advantages: float [N] (one per rollout, broadcast over its tokens) or [N, C].
        mask: [N, C] real completion tokens.
        epsilon_low, epsilon_high: clip range (DAPO's "clip-higher" uses epsilon_high > epsilon_low).
        ref_logprobs: float [N, C] under the frozen reference, required when beta > 0.
        beta: weight of the k3 KL penalty (0 disables it and ref_logprobs is ignored).
        aggregation, normalizer, max_length: see :func:`aggregate_token_loss`.

    Returns:
        (loss scalar, :class:`LossStats`).
    """
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"logprobs, old_logprobs and mask must share a shape [N, C]; got {tuple(logprobs.shape)}, "
                         f"{tuple(old_logprobs.shape)}, {tuple(mask.shape)}")
    if not (epsilon_low >= 0 and epsilon_high >= 0):
        raise ValueError(f"epsilon_low and epsilon_high must be >= 0, got {epsilon_low}, {epsilon_high}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if advantages.dim() == 1:
        if advantages.shape[0] != logprobs.shape[0]:
            raise ValueError(f"advantages must be [N] or [N, C] with N={logprobs.shape[0]}, "
                             f"got {tuple(advantages.shape)}")
        advantages = advantages[:, None]
    elif advantages.shape != logprobs.shape:
        raise ValueError(f"advantages must be [N] or [N, C] = {tuple(logprobs.shape)}, got {tuple(advantages.shape)}")
    advantages = advantages.to(logprobs.dtype)

    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    per_token = -torch.minimum(ratio * advantages, clipped * advantages)
    kl = None
    if beta > 0:
        if ref_logprobs is None:
            raise ValueError("ref_logprobs is required when beta > 0")
        kl = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + beta * kl
    loss = aggregate_token_loss(per_token, mask, aggregation, normalizer, max_length)

    with torch.no_grad():
        weights = mask.to(logprobs.dtype)
        count = weights.sum().clamp_min(1.0)
        expanded = advantages.expand_as(ratio)
        low = ((ratio < 1.0 - epsilon_low) & (expanded < 0)).to(weights.dtype)
        high = ((ratio > 1.0 + epsilon_high) & (expanded > 0)).to(weights.dtype)
        stats = LossStats(
            clip_low_fraction=float((low * weights).sum() / count),
            clip_high_fraction=float((high * weights).sum() / count),
            ratio_mean=float((ratio * weights).sum() / count),
            kl_mean=float((kl * weights).sum() / count) if kl is not None else 0.0,
        )
    return loss, stats
