"""GAE and the clipped value loss against independent float64 transcriptions, on ragged masks."""
from __future__ import annotations

import math
import random

import pytest
import torch

from megacov.algorithms import algorithm_hparams, compute_advantages
from megacov.algorithms.advantages import gae_advantages_returns, gae_returns, outcome_token_rewards
from megacov.algorithms.value import explained_variance, value_loss_sum


def _ragged(seed: int, b: int = 6, t: int = 11, holes: bool = False):
    g = random.Random(seed)
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i in range(b):
        if i == b - 1:
            continue  # a row without valid tokens (overlong-filtered)
        start = g.randint(1, t // 2)
        end = g.randint(start, t - 1)
        mask[i, start:end + 1] = True
        if holes and end - start > 2:
            mask[i, start + 1] = False
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(b, t, generator=gen, dtype=torch.float64)
    rewards = torch.randn(b, generator=gen, dtype=torch.float64)
    return rewards, values, mask


def _reference(rewards, values, mask, gamma, lam):
    """Per row, over the list of valid tokens: delta_k = r_k + gamma V_{k+1} - V_k, A_k = sum_l
    (gamma lam)^l delta_{k+l}; the outcome reward sits on the last valid token."""
    b, t = mask.shape
    adv = [[0.0] * t for _ in range(b)]
    ret = [[0.0] * t for _ in range(b)]
    for i in range(b):
        cols = [c for c in range(t) if mask[i, c]]
        if not cols:
            continue
        v = [float(values[i, c]) for c in cols] + [0.0]
        r = [0.0] * len(cols)
        r[-1] = float(rewards[i])
        deltas = [r[k] + gamma * v[k + 1] - v[k] for k in range(len(cols))]
        for k, c in enumerate(cols):
            a = sum((gamma * lam) ** (l - k) * deltas[l] for l in range(k, len(cols)))
            adv[i][c] = a
            ret[i][c] = a + v[k]
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.9, 0.8), (0.99, 0.0)])
@pytest.mark.parametrize("holes", [False, True])
def test_gae_matches_float64_transcription(gamma, lam, holes):
    for seed in range(3):
        rewards, values, mask = _ragged(seed, holes=holes)
        adv, ret = gae_advantages_returns(outcome_token_rewards(rewards, mask), values, mask, gamma=gamma, lam=lam)
        ref_adv, ref_ret = _reference(rewards, values, mask, gamma, lam)
        torch.testing.assert_close(adv, ref_adv, rtol=0, atol=1e-12)
        torch.testing.assert_close(ret, ref_ret, rtol=0, atol=1e-12)


def test_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards, values, mask = _ragged(7)
    adv, ret = gae_advantages_returns(outcome_token_rewards(rewards, mask), values, mask, gamma=1.0, lam=1.0)
    # outcome reward only: reward-to-go is the sequence's reward on every valid token
    to_go = torch.where(mask, rewards.unsqueeze(1).expand_as(values), torch.zeros_like(values))
    torch.testing.assert_close(adv, torch.where(mask, to_go - values, torch.zeros_like(values)), rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, to_go, rtol=0, atol=1e-12)


def test_registered_gae_whitening_modes():
    rewards, values, mask = _ragged(3)
    groups = torch.arange(rewards.shape[0])
    raw = compute_advantages("gae", rewards, groups, mask, algorithm_hparams(gae_whiten="none"), values=values)
    ref, _ = _reference(rewards, values, mask, 1.0, 0.95)
    torch.testing.assert_close(raw.double(), ref, rtol=0, atol=1e-6)
    vals = ref[mask]
    std = math.sqrt(float(((vals - vals.mean()) ** 2).sum() / (vals.numel() - 1)))
    whitened = compute_advantages("gae", rewards, groups, mask, algorithm_hparams(), values=values)
    torch.testing.assert_close(whitened.double()[mask], (vals - vals.mean()) / std, rtol=0, atol=1e-5)
    scaled = compute_advantages("gae", rewards, groups, mask, algorithm_hparams(gae_whiten="std"), values=values)
    torch.testing.assert_close(scaled.double()[mask], vals / std, rtol=0, atol=1e-5)
    assert float(whitened[~mask].abs().max()) == 0.0
    with pytest.raises(ValueError, match="needs critic values"):
        compute_advantages("gae", rewards, groups, mask)
    returns = gae_returns(rewards, values, mask, algorithm_hparams())
    torch.testing.assert_close(returns.double(), _reference(rewards, values, mask, 1.0, 0.95)[1], atol=1e-6, rtol=0)


def test_broken_recursion_is_caught():
    """The comparison can fail: the dense recursion over all columns (masked values zeroed), which
    breaks the chain at a hole inside a response, differs from the transcription there."""
    rewards, values, mask = _ragged(1, holes=True)
    ref, _ = _reference(rewards, values, mask, 0.9, 0.8)
    r, v = outcome_token_rewards(rewards, mask), torch.where(mask, values, torch.zeros_like(values))
    dense = torch.zeros_like(r)
    nxt_v = nxt_a = torch.zeros(r.shape[0], dtype=torch.float64)
    for t in range(r.shape[1] - 1, -1, -1):
        nxt_a = r[:, t] + 0.9 * nxt_v - v[:, t] + 0.72 * nxt_a
        nxt_v = v[:, t]
        dense[:, t] = nxt_a
    dense = torch.where(mask, dense, torch.zeros_like(dense))
    assert not torch.allclose(dense, ref)
    adv, _ = gae_advantages_returns(r, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, ref, rtol=0, atol=1e-12)


def test_clipped_value_loss_and_explained_variance():
    g = torch.Generator().manual_seed(0)
    v, old, ret = (torch.randn(4, 9, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(4, 9, generator=g) > 0.3
    loss, m = value_loss_sum(v, old, ret, mask, clip=0.2)
    ref, clipped = 0.0, 0
    for i in range(4):
        for j in range(9):
            if not mask[i, j]:
                continue
            vc = float(old[i, j]) + min(max(float(v[i, j] - old[i, j]), -0.2), 0.2)
            a, b = (float(v[i, j]) - float(ret[i, j])) ** 2, (vc - float(ret[i, j])) ** 2
            ref += 0.5 * max(a, b)
            clipped += b > a
    assert abs(float(loss) - ref) < 1e-12 and int(m["clipped"]) == clipped and int(m["tokens"]) == int(mask.sum())
    plain, _ = value_loss_sum(v, old, ret, mask, clip=None)
    assert abs(float(plain) - 0.5 * float(((v - ret) ** 2)[mask].sum())) < 1e-12
    assert explained_variance(ret, ret, mask) == 1.0
    assert abs(explained_variance(ret, torch.full_like(ret, float(ret[mask].mean())), mask)) < 1e-12


def test_explained_variance_at_the_last_token():
    from megacov.algorithms.value import last_tokens, value_metrics

    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    expect = torch.zeros_like(mask)
    expect[0, 2] = expect[1, 3] = expect[3, 2] = True
    assert torch.equal(last_tokens(mask), expect)
    # a critic right at every last token but wrong before it: perfect there, poor over all tokens
    returns = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=torch.float32)
    values = torch.where(expect, returns, 0.5 * torch.ones_like(returns))
    m = value_metrics(returns, values, mask)
    assert m["critic/explained_var_last"] == 1.0
    assert m["critic/explained_var"] < 0.5
    r, v = returns[expect].double(), torch.full((3,), 0.5, dtype=torch.float64)
    assert value_metrics(returns, 0.5 * torch.ones_like(returns), mask)["critic/explained_var_last"] == \
        pytest.approx(float(1 - (r - v).var(unbiased=False) / r.var(unbiased=False)))
