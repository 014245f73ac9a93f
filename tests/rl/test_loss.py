"""GRPO-family losses: advantages and every variant against hand-computed values and TRL's formula."""
from __future__ import annotations

import math

import pytest
import torch

from thinktune.rl.loss import (clipped_surrogate, constant_normalized, group_advantages, per_token_kl, policy_loss,
                               sequence_normalized, token_normalized)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    scaled = group_advantages(rewards, 4, scale_rewards=True)
    std = math.sqrt(1.0 / 3.0)  # deviations +-0.5, unbiased: 4 x 0.25 / 3
    a = 0.5 / (std + 1e-4)
    assert torch.allclose(scaled.advantages, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]))
    assert scaled.zero_variance.tolist() == [False, True]
    dr = group_advantages(rewards, 4, scale_rewards=False)  # Dr. GRPO: centred only
    assert torch.allclose(dr.advantages, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    with pytest.raises(ValueError):
        group_advantages(rewards, 3)


def test_normalizations_by_hand():
    token_loss = torch.tensor([[-1.0, -1.0, 9.0], [2.0, 2.0, 2.0]])  # 9.0 sits on a masked token
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    num, count = sequence_normalized(token_loss, mask)
    assert (float(num), count) == (1.0, 2)  # (-1 + 2) over 2 completions: GRPO 0.5
    num, count = token_normalized(token_loss, mask)
    assert (float(num), count) == (4.0, 5)  # (-2 + 6) over 5 tokens: DAPO 0.8
    num, count = constant_normalized(token_loss, mask, max_completion_tokens=4)
    assert (float(num), count) == (4.0, 8)  # over 2 x 4: Dr. GRPO 0.5
    fully_masked = torch.tensor([[1, 1, 0], [0, 0, 0]])  # a masked truncated completion still counts (as in TRL)
    num, count = sequence_normalized(token_loss, fully_masked)
    assert (float(num), count) == (-1.0, 2)


def test_clipping_by_hand():
    logps = torch.zeros(1, 3)
    old = -torch.log(torch.tensor([[1.5, 0.5, 0.5]]))  # ratios 1.5, 0.5, 0.5
    loss, region = clipped_surrogate(logps, old, torch.tensor([1.0]), 0.2, 0.2)
    assert torch.allclose(loss, torch.tensor([[-1.2, -0.5, -0.5]]))  # 1.5 clipped to 1.2; 0.5 * A < 0.8 * A kept
    assert region.tolist() == [[True, False, False]]
    loss, region = clipped_surrogate(logps, old, torch.tensor([-2.0]), 0.2, 0.28)
    assert torch.allclose(loss, torch.tensor([[3.0, 1.6, 1.6]]))  # -min(1.5*-2, 1.28*-2) = 3; -min(-1, -1.6) = 1.6
    assert region.tolist() == [[False, True, True]]


def test_kl_by_hand():
    kl = per_token_kl(torch.tensor([-1.0, -2.0, -1.0]), torch.tensor([-2.0, -1.0, -1.0]))
    assert torch.allclose(kl, torch.tensor([math.exp(-1), math.exp(1) - 2, 0.0]))


def test_policy_loss_gradient_on_policy():
    """On-policy (ratio 1) the GRPO gradient w.r.t. a token's log-prob is -A / (completion length x completions)."""
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = policy_loss(logps, logps.detach(), torch.tensor([1.0, -2.0]), mask, epsilon_low=0.2, epsilon_high=0.2)
    (out.numerator / out.count).backward()
    assert torch.allclose(logps.grad, torch.tensor([[-1 / 4, -1 / 4, 0.0], [2 / 6, 2 / 6, 2 / 6]]))
    assert (out.tokens, out.clipped_tokens, out.kl_sum) == (5, 0, 0.0)


def trl_grpo_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, mask, beta, eps_low,
                  eps_high, loss_type, max_completion_length):
    """trl 1.16 GRPOTrainer._compute_loss, token-level importance sampling, one process, no accumulation
    (transcribed from its source for the test; trl is not a dependency)."""
    advantages = advantages.unsqueeze(1)
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)  # dapo, num_items_in_batch = mask.sum()


@pytest.mark.parametrize("normalization, loss_type", [("sequence", "grpo"), ("token", "dapo"), ("constant", "dr_grpo")])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_matches_trl_formula(normalization: str, loss_type: str, beta: float):
    gen = torch.Generator().manual_seed(0)
    logps = -torch.rand(6, 7, generator=gen) * 3
    old = logps + torch.randn(6, 7, generator=gen) * 0.3  # off-policy enough that both clip sides trigger
    ref = logps + torch.randn(6, 7, generator=gen) * 0.5
    adv = group_advantages(torch.rand(6, generator=gen), 3).advantages
    mask = (torch.rand(6, 7, generator=gen) > 0.3).float()
    out = policy_loss(logps, old, adv, mask, epsilon_low=0.2, epsilon_high=0.28, beta=beta, ref_logps=ref,
                      normalization=normalization, max_completion_tokens=7)
    expected = trl_grpo_loss(logps, old, ref, adv, mask, beta, 0.2, 0.28, loss_type, 7)
    assert torch.allclose(out.numerator / out.count, expected, atol=1e-6)
    assert out.clipped_tokens > 0
    if beta:
        assert math.isclose(out.kl_sum, float((per_token_kl(logps, ref) * mask).sum()), rel_tol=1e-6)


def test_split_micro_batches_sum_to_the_whole():
    """Numerators and counts add up over micro-batches: the step's loss equals the one-batch loss (token/constant)."""
    gen = torch.Generator().manual_seed(1)
    logps, adv = -torch.rand(4, 5, generator=gen), torch.randn(4, generator=gen)
    mask = (torch.rand(4, 5, generator=gen) > 0.2).float()
    for normalization in ("sequence", "token", "constant"):
        kw = dict(epsilon_low=0.2, epsilon_high=0.2, normalization=normalization, max_completion_tokens=5)
        whole = policy_loss(logps, logps, adv, mask, **kw)
        parts = [policy_loss(logps[i:i + 2], logps[i:i + 2], adv[i:i + 2], mask[i:i + 2], **kw) for i in (0, 2)]
        assert torch.allclose(sum(p.numerator for p in parts) / sum(p.count for p in parts), whole.numerator / whole.count)
