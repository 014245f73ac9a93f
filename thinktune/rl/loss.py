"""GRPO-family losses: each variant a small named function over the same tensors.

Shapes: `rewards` (N,) with the G completions of a prompt adjacent; per-token tensors (B, T) over the
completion tokens, `mask` (B, T) 1 on tokens that count (0 on padding and on masked truncated
completions). The formulas follow TRL's GRPOTrainer (trl 1.16, `_compute_loss`):

    ratio   = exp(logp - logp_old)
    loss_t  = -min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * KL_t
    KL_t    = exp(logp_ref - logp) - (logp_ref - logp) - 1             (the k3 estimator)

and the token losses are reduced by one of three normalisations, each returned as a (numerator,
count) pair so that the training step can divide the numerators of all its micro-batches (and of all
processes) by the step's total count:
- `sequence_normalized` (GRPO): sum over completions of their mean token loss / completions;
- `token_normalized` (DAPO): sum of token losses / completion tokens;
- `constant_normalized` (Dr. GRPO): sum of token losses / (completions x max_completion_tokens).
With one micro-batch, numerator / count is TRL's `grpo`, `dapo` and `dr_grpo` loss.
This module never touches a model; it is pure tensor arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

STD_EPSILON = 1e-4  # TRL's: advantages / (std + 1e-4)


@dataclass
class GroupAdvantages:
    advantages: torch.Tensor
    """(N,) reward minus its group's mean (divided by the group's std + 1e-4 when scaled)."""
    zero_variance: torch.Tensor
    """(N // G,) bool: the group's rewards are all equal (its advantages are 0: no learning signal)."""


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: bool = True) -> GroupAdvantages:
    """Group-normalised advantages: (r - mean_group) / (std_group + 1e-4), or r - mean_group (Dr. GRPO).

    The std is the unbiased (Bessel-corrected) one, as in TRL.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    mean = grouped.mean(dim=1)
    std = grouped.std(dim=1)
    advantages = (grouped - mean[:, None]).reshape(-1)
    if scale_rewards:
        advantages = advantages / (std.repeat_interleave(group_size) + STD_EPSILON)
    return GroupAdvantages(advantages, torch.isclose(std, torch.zeros_like(std)))


def per_token_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """The k3 estimate of KL(policy || reference) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon_low: float,
                      epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped per-token loss with GRPO's sequence advantages, and where the clip was active.

    advantages: (B,) one per completion. Returns (loss (B, T), clipped (B, T) bool) where clipped marks the
    tokens whose ratio left [1 - eps_low, 1 + eps_high] on the side that stops the gradient (TRL's
    `is_region_clipped`).
    """
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv
    loss = -torch.min(unclipped, clipped)
    region = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    return loss, region


def sequence_normalized(token_loss: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """GRPO: each completion's mean token loss, summed; count = completions (a fully masked one counts, as in TRL)."""
    mask = mask.to(token_loss.dtype)
    per_sequence = (token_loss * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
    return per_sequence.sum(), token_loss.shape[0]


def token_normalized(token_loss: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """DAPO: the sum of token losses; count = completion tokens that count."""
    return (token_loss * mask.to(token_loss.dtype)).sum(), int(mask.sum())


def constant_normalized(token_loss: torch.Tensor, mask: torch.Tensor, max_completion_tokens: int) -> tuple[torch.Tensor, int]:
    """Dr. GRPO: the sum of token losses; count = completions x max_completion_tokens (independent of lengths)."""
    return (token_loss * mask.to(token_loss.dtype)).sum(), token_loss.shape[0] * max_completion_tokens


NORMALIZATIONS = {"sequence": sequence_normalized, "token": token_normalized, "constant": constant_normalized}


@dataclass
class PolicyLoss:
    numerator: torch.Tensor
    """The summed loss of this micro-batch (divide by the step's total `count`)."""
    count: int
    """What this micro-batch adds to the normaliser (completions, tokens, or completions x max tokens)."""
    kl_sum: float
    """Sum of the per-token KL over counted tokens (0 without a reference)."""
    clipped_tokens: int
    """Counted tokens whose ratio was clipped."""
    tokens: int
    """Counted tokens."""


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                epsilon_low: float, epsilon_high: float, beta: float = 0.0, ref_logps: torch.Tensor | None = None,
                normalization: str = "sequence", max_completion_tokens: int = 0) -> PolicyLoss:
    """The GRPO-family loss of one micro-batch: clipped surrogate (+ beta x KL), then the chosen normalisation."""
    token_loss, region = clipped_surrogate(logps, old_logps, advantages, epsilon_low, epsilon_high)
    kl_sum = 0.0
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probabilities")
        kl = per_token_kl(logps, ref_logps)
        token_loss = token_loss + beta * kl
        kl_sum = float((kl.detach() * mask).sum())
    if normalization == "constant":
        numerator, count = constant_normalized(token_loss, mask, max_completion_tokens)
    else:
        numerator, count = NORMALIZATIONS[normalization](token_loss, mask)
    counted = mask.bool()
    return PolicyLoss(numerator, count, kl_sum, int((region & counted).sum()), int(counted.sum()))
