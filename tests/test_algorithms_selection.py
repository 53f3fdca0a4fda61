"""Token selection: the hash against its pure-Python specification, top-k / smallest-key choice
against a sort-based reference (ties included), and the Clip-Cov / KL-Cov choice rules."""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacov.algorithms import selection as sel

_MASK64 = (1 << 64) - 1


def _splitmix64_spec(x: int) -> int:
    # Written out independently of megacov from the published splitmix64 constants.
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def test_splitmix64_known_values():
    # First outputs of the splitmix64 generator seeded with 0 (state advances by the golden gamma),
    # as published with the reference C implementation.
    assert sel.splitmix64(0) == 0xE220A8397B1DCDAF
    assert sel.splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4
    assert sel.splitmix64(2 * 0x9E3779B97F4A7C15 & _MASK64) == 0x06C45D188009454F


@pytest.mark.parametrize("seed,step", [(0, 0), (1234, 7), (-1, 2**40), (2**63 + 5, -3)])
def test_token_keys_match_python_reference(seed, step):
    rng = random.Random(seed & 0xFFFF)
    ids = [0, 1, 2, 65535, 65536, 2**32 - 1, 2**32, 2**47 + 3, 2**62, 2**63 - 1]
    ids += [rng.randrange(0, 2**63) for _ in range(500)]
    keys = sel.token_keys(seed, step, torch.tensor(ids, dtype=torch.int64))
    prefix = _splitmix64_spec(_splitmix64_spec(seed & _MASK64) ^ (step & _MASK64))
    expected = [_splitmix64_spec(prefix ^ i) >> 1 for i in ids]
    assert keys.tolist() == expected
    assert all(sel.token_keys_reference(seed, step, i) == e for i, e in zip(ids, expected))
    assert bool((keys >= 0).all())


def test_token_keys_shape_and_dependence():
    ids = torch.arange(4096, dtype=torch.int64).reshape(64, 64)
    k = sel.token_keys(3, 1, ids)
    assert k.shape == ids.shape and k.dtype == torch.int64
    assert k.unique().numel() == ids.numel()
    # A different step or seed reorders the tokens (otherwise Clip-Cov would pick the same ones forever).
    order = torch.argsort(k.reshape(-1))
    assert not torch.equal(order, torch.argsort(sel.token_keys(3, 2, ids).reshape(-1)))
    assert not torch.equal(order, torch.argsort(sel.token_keys(4, 1, ids).reshape(-1)))
    # Roughly uniform: each of 8 key ranges holds about 1/8 of the tokens.
    counts = torch.bincount((k.reshape(-1) >> 60), minlength=8)
    assert int(counts.min()) > 4096 / 8 * 0.8
    with pytest.raises(TypeError):
        sel.token_keys(0, 0, ids.to(torch.int32))


def test_key_stream_epoch_zero_keeps_the_step_and_later_epochs_draw_anew():
    # Epoch 0 must reproduce the keys of runs made before the epoch joined the key.
    assert sel.key_stream(7) == sel.key_stream(7, 0) == 7
    assert sel.token_keys_reference(3, sel.key_stream(7, 0), 11) == sel.token_keys_reference(3, 7, 11)
    ids = torch.arange(4096, dtype=torch.int64)
    orders = [torch.argsort(sel.token_keys(3, sel.key_stream(7, e), ids)) for e in range(3)]
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    # No (step, epoch) pair shares another's stream.
    streams = {sel.key_stream(s, e) for s in (0, 1, 2**39, 2**40 - 1) for e in range(4)}
    assert len(streams) == 16
    for bad in ((-1, 0), (2**40, 0), (0, -1)):
        with pytest.raises(ValueError):
            sel.key_stream(*bad)


def test_clip_cov_choice_changes_with_the_epoch():
    from megacov.algorithms import algorithm_hparams

    torch.manual_seed(0)
    b, t = 16, 32
    log_prob = -torch.rand(b, t, dtype=torch.float64) * 3
    advantages = torch.randn(b, 1, dtype=torch.float64).expand(b, t).contiguous()
    mask = torch.ones(b, t, dtype=torch.bool)
    hp = algorithm_hparams(clip_cov_ratio=0.05, clip_cov_lb=-1e9, clip_cov_ub=1e9, seed=1)
    ids = sel.default_global_ids(mask)
    stats = sel.scope_stats(log_prob, advantages, mask)
    pick = [sel.select_clip_cov(log_prob, log_prob, advantages, mask, ids, stats, hp=hp,
                                step=sel.key_stream(5, e)) for e in (0, 1)]
    assert int(pick[0].sum()) == int(pick[1].sum()) > 0
    assert torch.equal(pick[0], sel.select_clip_cov(log_prob, log_prob, advantages, mask, ids, stats, hp=hp, step=5))
    assert not torch.equal(pick[0], pick[1])


def _reference_choice(order, candidates, ids, n, largest):
    items = [(o, i) for o, c, i in zip(order, candidates, ids) if c]
    items.sort(key=lambda t: ((-t[0] if largest else t[0]), t[1]))
    return {i for _, i in items[:max(n, 0)]}


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_select_matches_sorted_reference(data):
    size = data.draw(st.integers(1, 60))
    # Few distinct values so that exact ties are frequent.
    vals = data.draw(st.lists(st.integers(-3, 3), min_size=size, max_size=size))
    cands = data.draw(st.lists(st.booleans(), min_size=size, max_size=size))
    ids = data.draw(st.permutations(list(range(0, 7 * size, 7))))
    n = data.draw(st.integers(0, size + 2))
    t_ids = torch.tensor(ids, dtype=torch.int64)
    t_cand = torch.tensor(cands)
    largest = sel.select_largest(torch.tensor(vals, dtype=torch.float32), t_cand, t_ids, n)
    smallest = sel.select_smallest(torch.tensor(vals, dtype=torch.int64), t_cand, t_ids, n)
    got_l = {i for i, s in zip(ids, largest.tolist()) if s}
    got_s = {i for i, s in zip(ids, smallest.tolist()) if s}
    assert got_l == _reference_choice(vals, cands, ids, n, largest=True)
    assert got_s == _reference_choice(vals, cands, ids, n, largest=False)


def test_select_largest_nan_and_inf_rank_last():
    v = torch.tensor([float("nan"), 1.0, float("-inf"), 2.0, float("inf")])
    ids = torch.arange(5)
    cand = torch.tensor([True, True, True, True, False])
    got = sel.select_largest(v, cand, ids, 3)
    # 2 and 1 first; NaN ranks as -inf and ties with the real -inf, so the smaller id (0) wins.
    assert got.tolist() == [True, True, False, True, False]


def test_counts():
    assert sel.clip_cov_count(0, 2e-4) == 0
    assert sel.clip_cov_count(10, 2e-4) == 1
    assert sel.clip_cov_count(100_000, 2e-4) == 20
    assert sel.kl_cov_count(1_000_001, 2e-3) == 2000
    assert sel.kl_cov_count(3, 1.0) == 3


def test_covariance_hand_case():
    lp = torch.tensor([[-1.0, -2.0, 99.0]])
    adv = torch.tensor([[1.0, -1.0, 50.0]])
    mask = torch.tensor([[True, True, False]])
    stats = sel.scope_stats(lp, adv, mask)
    assert stats.n_valid == 2
    assert float(stats.mean_logp) == -1.5 and float(stats.mean_adv) == 0.0
    cov = sel.covariance(lp, adv, mask, stats.mean_logp, stats.mean_adv)
    assert cov.tolist() == [[0.5, 0.5, 0.0]]


def test_clip_cov_eligibility_bounds_are_strict():
    cov = torch.tensor([1.0, 1.5, 5.0, 4.99, 0.5, 3.0])
    clipped = torch.tensor([False, False, False, False, False, True])
    mask = torch.tensor([True, True, True, True, True, True])
    got = sel.clip_cov_eligible(cov, clipped, mask, 1.0, 5.0)
    assert got.tolist() == [False, True, False, True, False, False]


def test_ppo_clipped_mask_hand_case():
    # ratios 1.5 (A>0: clipped above 1.28), 0.5 (A<0: clipped below 0.8), 1.1 (inside), 1.5 with A<0
    # (unclipped term is larger: not clipped), padding never clipped.
    ratio = torch.tensor([[1.5, 0.5, 1.1, 1.5, 3.0]])
    old = torch.zeros_like(ratio)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    got = sel.ppo_clipped_mask(ratio.log(), old, adv, mask, 0.2, 0.28)
    assert got.tolist() == [[True, True, False, False, False]]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_shards=st.integers(1, 5), B=st.integers(1, 10), T=st.integers(1, 9),
       ratio=st.sampled_from([0.01, 0.1, 0.3, 1.0]))
def test_sharded_choice_equals_whole_scope_choice(seed, n_shards, B, T, ratio):
    """Any split of the scope over shards (ranks x micro-batches) chooses the same tokens, given the
    scope statistics: local candidates, gathered, chosen once, mapped back."""
    from megacov.algorithms import algorithm_hparams

    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    # few distinct advantages and rounded log-probs: covariance ties are common
    adv = torch.randint(-2, 3, (B, 1), generator=g).to(torch.float64).expand(B, T).clone()
    lp = (lp * 4).round() / 4
    mask = torch.rand(B, T, generator=g) < 0.8
    hp = algorithm_hparams(clip_cov_ratio=ratio, kl_cov_ratio=ratio, clip_cov_lb=-0.5, clip_cov_ub=3.0, seed=seed)
    ids = torch.randperm(B * T * 3, generator=g)[: B * T].reshape(B, T)
    stats = sel.scope_stats(lp, adv, mask)
    whole_cc = sel.select_clip_cov(lp, old, adv, mask, ids, stats, hp=hp, step=seed)
    whole_kl = sel.select_kl_cov(lp, adv, mask, ids, stats, kl_cov_ratio=ratio)
    owner = torch.randint(0, n_shards, (B,), generator=g)
    shards = [torch.nonzero(owner == s).flatten() for s in range(n_shards)]
    cc = [sel.clip_cov_candidates(lp[r], old[r], adv[r], mask[r], ids[r], stats, hp=hp, step=seed) for r in shards]
    kl = [sel.kl_cov_candidates(lp[r], adv[r], mask[r], ids[r], stats, kl_cov_ratio=ratio) for r in shards]
    cc_ids, cc_keys = torch.cat([c[0] for c in cc]), torch.cat([c[1] for c in cc])
    kl_ids, kl_vals = torch.cat([c[0] for c in kl]), torch.cat([c[1] for c in kl])
    n = sel.clip_cov_count(stats.n_valid, ratio)
    k = sel.kl_cov_count(stats.n_valid, ratio)
    chosen_cc = cc_ids[sel.select_smallest(cc_keys, torch.ones_like(cc_ids, dtype=torch.bool), cc_ids, n)]
    chosen_kl = kl_ids[sel.select_largest(kl_vals, torch.ones_like(kl_ids, dtype=torch.bool), kl_ids, k)]
    got_cc = torch.zeros_like(mask)
    got_kl = torch.zeros_like(mask)
    for r in shards:
        got_cc[r] = sel.mask_from_ids(ids[r], chosen_cc)
        got_kl[r] = sel.mask_from_ids(ids[r], chosen_kl)
    assert torch.equal(got_cc, whole_cc)
    assert torch.equal(got_kl, whole_kl)
