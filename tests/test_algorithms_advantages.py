"""Advantage estimators against plain-Python float64 transcriptions, plus hand cases."""
from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacov.algorithms import algorithm_hparams, compute_advantages, list_advantages
from megacov.algorithms.advantages import VALUE_ADVANTAGES


def _groups(rewards, gids):
    out = {}
    for r, g in zip(rewards, gids):
        out.setdefault(g, []).append(r)
    return out


def _ref_seq_adv(name, rewards, gids, lens, norm_by_std=True):
    groups = _groups(rewards, gids)
    eps = 1e-6
    if name in ("grpo", "rloo", "reinforce_pp_baseline"):
        out = []
        for r, g in zip(rewards, gids):
            rs = groups[g]
            if len(rs) == 1:
                out.append(0.0)
            elif name == "grpo":
                a = r - statistics.fmean(rs)
                out.append(a / (statistics.stdev(rs) + eps) if norm_by_std else a)
            elif name == "rloo":
                out.append(r - (sum(rs) - r) / (len(rs) - 1))
            else:
                out.append(r - statistics.fmean(rs))
        if name != "reinforce_pp_baseline":
            return out
        rewards = out
    # token-weighted whitening over the valid tokens
    toks = [v for v, n in zip(rewards, lens) for _ in range(n)]
    if len(toks) < 2:
        return [0.0] * len(rewards)
    mu = statistics.fmean(toks)
    sd = math.sqrt(statistics.variance(toks) + eps**2)
    return [(v - mu) / sd for v in rewards]


@settings(max_examples=40, deadline=None)
@given(data=st.data(), name=st.sampled_from(["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]),
       norm_by_std=st.booleans())
def test_estimators_match_reference(data, name, norm_by_std):
    B = data.draw(st.integers(1, 12))
    T = data.draw(st.integers(1, 6))
    rewards = data.draw(st.lists(st.sampled_from([0.0, 1.0, 0.5, -1.0, 2.5]), min_size=B, max_size=B))
    gids = data.draw(st.lists(st.integers(0, 3), min_size=B, max_size=B))
    lens = data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    mask = torch.tensor([[t < n for t in range(T)] for n in lens])
    adv = compute_advantages(name, torch.tensor(rewards), torch.tensor(gids) * 17, mask,
                             algorithm_hparams(norm_adv_by_std=norm_by_std))
    ref = _ref_seq_adv(name, rewards, gids, lens, norm_by_std)
    assert adv.dtype == torch.float32 and adv.shape == (B, T)
    expected = torch.tensor([[ref[b] if t < lens[b] else 0.0 for t in range(T)] for b in range(B)])
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-5)


def test_grpo_hand_case():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    gids = torch.tensor([0, 0, 0, 0, 1, 1])
    mask = torch.ones(6, 2, dtype=torch.bool)
    mask[3, 1] = False
    adv = compute_advantages("grpo", rewards, gids, mask)
    # group 0: mean 0.25, unbiased std 0.5 -> +1.5, -0.5; group 1 all equal -> 0
    torch.testing.assert_close(adv[:, 0], torch.tensor([1.5, -0.5, -0.5, -0.5, 0.0, 0.0]), atol=1e-5, rtol=0)
    assert adv[3, 1] == 0.0
    dr = compute_advantages("grpo", rewards, gids, mask, algorithm_hparams(norm_adv_by_std=False))
    torch.testing.assert_close(dr[:, 0], torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0, 0.0]))


def test_rloo_hand_case():
    adv = compute_advantages("rloo", torch.tensor([3.0, 1.0, 2.0]), torch.tensor([5, 5, 5]),
                             torch.ones(3, 1, dtype=torch.bool))
    torch.testing.assert_close(adv[:, 0], torch.tensor([3 - 1.5, 1 - 2.5, 2 - 2.0]))


def test_group_order_and_ids_do_not_matter():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (16,), generator=g).float()
    gids = torch.arange(16) // 4
    mask = torch.rand(16, 8, generator=g) < 0.8
    perm = torch.randperm(16, generator=g)
    values = torch.randn(16, 8, generator=g)
    for name in list_advantages():
        v = values if name in VALUE_ADVANTAGES else None
        a = compute_advantages(name, rewards, gids, mask, values=v)
        b = compute_advantages(name, rewards[perm], gids[perm] * 1000 + 7, mask[perm],
                               values=v[perm] if v is not None else None)
        torch.testing.assert_close(a[perm], b)


def test_bad_input_is_named():
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        compute_advantages("grpo", torch.tensor([0.0, float("nan")]), torch.tensor([0, 0]), mask)
    with pytest.raises(ValueError, match="rewards \\[B\\]"):
        compute_advantages("grpo", torch.zeros(3), torch.zeros(3), mask)
    with pytest.raises(KeyError, match="registered: gae, grpo, reinforce_pp, reinforce_pp_baseline, rloo"):
        compute_advantages("vtrace", torch.zeros(2), torch.zeros(2), mask)
