"""Policy losses against a direct float64 transcription of the formulas (values and gradients),
hand-computed tiny cases, and the properties the parallel layer relies on."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacov.algorithms import LossNormalizer, aggregate, algorithm_hparams, get_policy_loss, policy_loss
from megacov.algorithms.selection import token_keys_reference
from megacov.config.schema import AlgorithmConfig

MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


# ----------------------------------------------------------------------------------------------
# float64 reference: per-token Python arithmetic on lists, autograd only for the gradient.
# ----------------------------------------------------------------------------------------------

def _ref_aggregate(loss, mask, mode, max_len):
    B, T = len(mask), len(mask[0])
    valid = [[mask[b][t] for t in range(T)] for b in range(B)]
    seqs = [b for b in range(B) if any(valid[b])]
    n_tok = sum(sum(r) for r in valid)
    total = 0.0
    for b in range(B):
        s = sum(loss[b][t] for t in range(T) if valid[b][t])
        if mode == "seq-mean-token-mean":
            s = s / max(sum(valid[b]), 1)
        total = total + s
    if mode == "token-mean":
        return total / max(n_tok, 1)
    if mode == "seq-mean-token-sum-norm":
        return total / (max(len(seqs), 1) * max_len)
    return total / max(len(seqs), 1)


def _ref_cov(lp, adv, mask):
    cells = [(b, t) for b in range(len(mask)) for t in range(len(mask[0])) if mask[b][t]]
    mlp = sum(float(lp[b][t]) for b, t in cells) / max(len(cells), 1)
    madv = sum(float(adv[b][t]) for b, t in cells) / max(len(cells), 1)
    return {(b, t): (float(adv[b][t]) - madv) * (float(lp[b][t]) - mlp) for b, t in cells}


def _ref_loss(name, lp, old, adv, mask, hp, step=0, ids=None):
    """lp: float64 tensor requiring grad; returns (loss tensor, chosen set of (b, t))."""
    B, T = mask.shape
    mk = mask.tolist()
    ids = ids if ids is not None else [[b * T + t for t in range(T)] for b in range(B)]
    lo, hi = 1 - hp.clip_ratio_low, 1 + hp.clip_ratio_high
    cov = _ref_cov(lp.detach().tolist(), adv.tolist(), mk)
    n_valid = len(cov)
    per_tok = [[torch.zeros((), dtype=torch.float64) for _ in range(T)] for _ in range(B)]
    chosen = set()
    ratio = {c: torch.exp(lp[c] - old[c]) for c in cov}
    A = {c: float(adv[c]) for c in cov}
    if name == "clip_cov":
        eligible = []
        for c in cov:
            r = float(ratio[c].detach())
            clipped = -A[c] * min(max(r, lo), hi) > -A[c] * r
            if not clipped and hp.clip_cov_lb < cov[c] < hp.clip_cov_ub:
                eligible.append(c)
        n = max(1, int(hp.clip_cov_ratio * n_valid)) if n_valid else 0
        eligible.sort(key=lambda c: (token_keys_reference(hp.seed, step, ids[c[0]][c[1]]), ids[c[0]][c[1]]))
        chosen = set(eligible[:n])
    if name == "kl_cov":
        k = max(1, int(hp.kl_cov_ratio * n_valid)) if n_valid else 0
        order = sorted(cov, key=lambda c: (-cov[c], ids[c[0]][c[1]]))
        chosen = set(order[:k])
    for c in cov:
        r = ratio[c]
        if name == "kl_cov":
            tok = -A[c] * r
            if c in chosen:
                tok = tok + hp.kl_cov_coef * (lp[c] - old[c]).abs()
        else:
            tok = torch.maximum(-A[c] * r, -A[c] * torch.clamp(r, lo, hi))
            if name == "ppo" and hp.clip_ratio_c is not None and A[c] < 0:
                tok = torch.minimum(tok, torch.tensor(-A[c] * hp.clip_ratio_c, dtype=torch.float64))
            if c in chosen:
                tok = tok * 0.0
        per_tok[c[0]][c[1]] = tok
    return _ref_aggregate(per_tok, mk, hp.loss_agg_mode, T), chosen


def _batch(seed, B=6, T=9, p_mask=0.75, spread=0.4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=dtype) * 4
    old = lp + spread * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, 1, generator=g, dtype=dtype).expand(B, T).clone()
    adv += 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    mask = torch.rand(B, T, generator=g) < p_mask
    mask[0, 0] = True
    return lp, old, adv, mask


CASES = [
    ("ppo", {}),
    ("ppo", {"clip_ratio_c": 3.0, "clip_ratio_low": 0.1}),
    ("clip_cov", {"clip_cov_ratio": 0.1, "clip_cov_lb": 0.05, "clip_cov_ub": 2.0}),
    ("clip_cov", {"clip_cov_ratio": 0.3, "clip_cov_lb": -1.0, "clip_cov_ub": 5.0,
                  "clip_ratio_low": 1.0, "clip_ratio_high": 1.0, "seed": 11}),
    ("kl_cov", {"kl_cov_ratio": 0.1}),
    ("kl_cov", {"kl_cov_ratio": 0.02, "kl_cov_coef": 0.5}),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,hps", CASES)
def test_loss_matches_float64_reference(name, hps, mode):
    for seed in range(3):
        lp, old, adv, mask = _batch(seed)
        hp = algorithm_hparams(loss_agg_mode=mode, **hps)
        x = lp.clone().requires_grad_()
        loss, metrics = policy_loss(name, x, old, adv, mask, loss_agg_mode=mode, step=seed, **hps)
        loss.backward()
        y = lp.clone().requires_grad_()
        ref, chosen = _ref_loss(name, y, old, adv, mask, hp, step=seed)
        ref.backward()
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, ref.reshape(()), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)
        if name != "ppo":
            got = {tuple(c) for c in metrics["selected"].nonzero().tolist()}
            assert got == chosen
            assert int(metrics["selected_count"]) == len(chosen)
            assert name == "kl_cov" or len(chosen) > 0 or seed > 0


def test_reference_cases_select_something():
    # The parametrised comparison above is only meaningful if the choices are non-trivial.
    lp, old, adv, mask = _batch(0)
    for name, hps in CASES[2:]:
        _, m = policy_loss(name, lp, old, adv, mask, **hps)
        assert int(m["selected_count"]) >= 1


def test_ppo_hand_case():
    # A=+1 r=1.5 -> clipped at 1.28; A=-1 r=0.5 -> clipped at 0.8; A=+1 r=1.1 -> unclipped -1.1;
    # A=-1 r=5 with dual clip c=3 -> min(5, 3) = 3.
    r = torch.tensor([[1.5, 0.5, 1.1, 5.0]], dtype=torch.float64)
    lp = r.log().requires_grad_()
    old = torch.zeros_like(r)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones_like(r, dtype=torch.bool)
    loss, m = policy_loss("ppo", lp, old, adv, mask, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    assert math.isclose(float(loss.detach()), (-1.28 + 0.8 - 1.1 + 3.0) / 4, rel_tol=1e-12)
    loss.backward()
    # d(-A r)/d logp = -A r on unclipped tokens; clipped tokens have zero gradient.
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 0.0, -1.1 / 4, 0.0]], dtype=torch.float64))
    assert math.isclose(float(m["clipfrac"]), 2 / 4)  # for r=5, A<0 the unclipped term is the max
    assert math.isclose(float(m["clipfrac_lower"]), 1 / 4)


def test_clip_cov_hand_case():
    # 4 valid tokens, ratio 0.5 -> n = 2; means: logp -2.5, A 0.
    lp = torch.tensor([[-1.0, -2.0, -3.0, -4.0]], dtype=torch.float64, requires_grad=True)
    old = lp.detach().clone()
    adv = torch.tensor([[2.0, 1.0, -1.0, -2.0]], dtype=torch.float64)
    # cov = A * (logp + 2.5) = [3.0, 0.5, 0.5, 3.0]; with lb 1, ub 5 tokens 0 and 3 are eligible.
    mask = torch.ones_like(adv, dtype=torch.bool)
    loss, m = policy_loss("clip_cov", lp, old, adv, mask, clip_cov_ratio=0.5, clip_cov_lb=1.0,
                          clip_cov_ub=5.0)
    assert m["selected"].tolist() == [[True, False, False, True]]
    assert math.isclose(float(loss.detach()), (-1.0 + 1.0) / 4)  # tokens 1, 2 remain: -A r = -1, +1
    loss.backward()
    assert lp.grad.tolist() == [[0.0, -0.25, 0.25, 0.0]]
    assert math.isclose(float(m["clipfrac"]), 0.5)
    # ratio 0.25 -> n = 1: the smaller key of ids 0 and 3 wins.
    _, m1 = policy_loss("clip_cov", lp, old, adv, mask, clip_cov_ratio=0.25, seed=5, step=9)
    first = 0 if token_keys_reference(5, 9, 0) < token_keys_reference(5, 9, 3) else 3
    assert m1["selected"][0].nonzero().flatten().tolist() == [first]


def test_kl_cov_hand_case():
    lp = torch.tensor([[-1.0, -2.0, -3.0, -4.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.5, -2.0, -3.0, -3.0]], dtype=torch.float64)
    adv = torch.tensor([[2.0, 1.0, -1.0, -2.0]], dtype=torch.float64)
    mask = torch.ones_like(adv, dtype=torch.bool)
    # cov (current logp, mean -2.5): [3, 0.5, 0.5, 3]; k = 1 -> tie between ids 0 and 3 -> id 0.
    loss, m = policy_loss("kl_cov", lp, old, adv, mask, kl_cov_ratio=0.25, kl_cov_coef=2.0)
    assert m["selected"].tolist() == [[True, False, False, False]]
    r = [math.exp(0.5), 1.0, 1.0, math.exp(-1.0)]
    expected = (-2 * r[0] + 2.0 * 0.5 - 1.0 + 1.0 + 2 * r[3]) / 4
    assert math.isclose(float(loss.detach()), expected, rel_tol=1e-12)
    assert math.isclose(float(m["ppo_kl"]), (0.5 + 0 + 0 + 1.0) / 4, rel_tol=1e-12)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[(-2 * r[0] + 2.0) / 4, -0.25, 0.25, 2 * r[3] / 4]],
                                                     dtype=torch.float64))


def test_kl_cov_on_policy_is_plain_policy_gradient():
    lp, _, adv, mask = _batch(4)
    x = lp.clone().requires_grad_()
    y = lp.clone().requires_grad_()
    loss, _ = policy_loss("kl_cov", x, lp, adv, mask, kl_cov_ratio=0.5)
    loss.backward()
    ref = aggregate(-adv * torch.exp(y - y.detach()), mask, "token-mean", LossNormalizer.from_mask(mask))
    ref.backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name,hps", CASES)
def test_given_selection_gives_identical_numbers(name, hps):
    lp, old, adv, mask = _batch(7, B=8, T=16)
    hp = algorithm_hparams(**hps)
    norm = LossNormalizer.from_mask(mask)
    fn = get_policy_loss(name)
    x1, x2 = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    l1, m1 = fn(x1, old, adv, mask, norm=norm, selected=None, hp=hp, step=3)
    sel = m1.get("selected", torch.zeros_like(mask))
    l2, m2 = fn(x2, old, adv, mask, norm=norm, selected=sel, hp=hp, step=3)
    (l1 + l2).backward()
    assert torch.equal(l1, l2) and torch.equal(x1.grad, x2.grad)
    for key in m1:
        assert torch.equal(m1[key], m2[key]), key


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,hps", CASES)
def test_micro_batches_sum_to_the_scope(name, hps, mode):
    """Split a scope into micro-batches: with the global normaliser, global statistics and the
    globally chosen tokens, losses, gradients and summable metrics add up to the whole."""
    from megacov.algorithms.losses import METRIC_REDUCTIONS
    from megacov.algorithms.selection import default_global_ids, scope_stats

    lp, old, adv, mask = _batch(9, B=8, T=12)
    hp = algorithm_hparams(loss_agg_mode=mode, **hps)
    norm = LossNormalizer.from_mask(mask)
    fn = get_policy_loss(name)
    x = lp.clone().requires_grad_()
    whole, mw = fn(x, old, adv, mask, norm=norm, selected=None, hp=hp, step=1)
    whole.backward()
    stats = scope_stats(lp, adv, mask)
    ids = default_global_ids(mask)
    chosen = mw.get("selected", torch.zeros_like(mask))
    y = lp.clone().requires_grad_()
    total, sums = 0.0, {}
    for rows in ([5, 0, 2], [7, 1], [3, 4, 6]):
        r = torch.tensor(rows)
        part, mp = fn(y[r], old[r], adv[r], mask[r], norm=norm, selected=chosen[r], hp=hp,
                      global_ids=ids[r], stats=stats, step=1)
        total = total + part
        for k, v in mp.items():
            if v.dim() == 0 and k not in METRIC_REDUCTIONS:
                sums[k] = sums.get(k, 0.0) + v
    total.backward()
    torch.testing.assert_close(total, whole, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-12, atol=1e-14)
    for k, v in sums.items():
        torch.testing.assert_close(torch.as_tensor(v, dtype=mw[k].dtype), mw[k], rtol=1e-12, atol=1e-14)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), name_i=st.integers(2, 5), B=st.integers(1, 6), T=st.integers(1, 12))
def test_properties(seed, name_i, B, T):
    name, hps = CASES[name_i]
    hp = algorithm_hparams(**hps)
    lp, old, adv, mask = _batch(seed, B=B, T=T)
    n_valid = int(mask.sum())
    _, m = policy_loss(name, lp, old, adv, mask, step=seed, **hps)
    chosen = m["selected"]
    assert not bool((chosen & ~mask).any())
    if name == "kl_cov":
        assert int(chosen.sum()) == min(n_valid, max(1, int(hp.kl_cov_ratio * n_valid)))
    else:
        from megacov.algorithms import selection as sel

        stats = sel.scope_stats(lp, adv, mask)
        cov = sel.covariance(lp, adv, mask, stats.mean_logp, stats.mean_adv)
        clipped = sel.ppo_clipped_mask(lp, old, adv, mask, hp.clip_ratio_low, hp.clip_ratio_high)
        eligible = sel.clip_cov_eligible(cov, clipped, mask, hp.clip_cov_lb, hp.clip_cov_ub)
        assert int(chosen.sum()) == min(int(eligible.sum()), sel.clip_cov_count(n_valid, hp.clip_cov_ratio))
        assert not bool((chosen & clipped).any())
        assert bool(((cov[chosen] > hp.clip_cov_lb) & (cov[chosen] < hp.clip_cov_ub)).all())
    # Permuting the rows (global ids travel with them) chooses the same tokens.
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(seed))
    ids = torch.arange(B * T).reshape(B, T)
    _, mp = policy_loss(name, lp[perm], old[perm], adv[perm], mask[perm], step=seed, global_ids=ids[perm], **hps)
    assert set(ids[perm][mp["selected"]].tolist()) == set(ids[chosen].tolist())


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), name_i=st.integers(0, 5), mode=st.sampled_from(MODES),
       junk=st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30, -7.0]))
def test_masked_tokens_never_influence_anything(seed, name_i, mode, junk):
    name, hps = CASES[name_i]
    lp, old, adv, mask = _batch(seed, B=4, T=10, p_mask=0.6)
    results = []
    for fill in (None, junk):
        a, b, c = lp.clone(), old.clone(), adv.clone()
        if fill is not None:
            a[~mask], b[~mask], c[~mask] = fill, -fill, fill
        x = a.requires_grad_()
        ent = torch.where(mask, torch.ones_like(a), torch.full_like(a, junk if fill is not None else 2.0))
        loss, m = policy_loss(name, x, b, c, mask, loss_agg_mode=mode, entropy=ent, **hps)
        loss.backward()
        results.append((loss, x.grad, m))
    (l0, g0, m0), (l1, g1, m1) = results
    assert torch.equal(l0, l1)
    assert torch.equal(g0, g1) and not bool(g1[~mask].any())
    for k in m0:
        assert torch.equal(m0[k], m1[k]), k


def test_float32_inputs_and_bad_shapes():
    lp, old, adv, mask = (t.float() if t.is_floating_point() else t for t in _batch(1))
    loss, m = policy_loss("kl_cov", lp, old, adv, mask)
    assert loss.dtype == torch.float32 and m["cov_mean"].dtype == torch.float32
    x = lp.to(torch.bfloat16).requires_grad_()  # bf16 actor log-probs: math in fp32, grad in bf16
    loss16, m16 = policy_loss("clip_cov", x, old, adv, mask, clip_cov_ratio=0.2, clip_cov_lb=0.0)
    loss16.backward()
    assert loss16.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert bool(torch.isfinite(x.grad.float()).all()) and int(m16["selected_count"]) >= 1
    with pytest.raises(ValueError, match="one \\[B, T\\] shape"):
        policy_loss("ppo", lp, old[:, :-1], adv, mask)
    with pytest.raises(KeyError, match="registered: cispo, clip_cov, gspo, kl_cov, ppo"):
        policy_loss("dapo", lp, old, adv, mask)
    with pytest.raises(TypeError, match="clip_cov_ration"):
        policy_loss("clip_cov", lp, old, adv, mask, clip_cov_ration=0.1)


def test_empty_scope_is_zero_not_nan():
    lp, old, adv, _ = _batch(2)
    mask = torch.zeros_like(lp, dtype=torch.bool)
    for name in ("ppo", "clip_cov", "kl_cov"):
        loss, m = policy_loss(name, lp.requires_grad_(), old, adv, mask)
        assert float(loss.detach()) == 0.0 and all(bool(torch.isfinite(v).all()) for v in m.values())


def test_defaults_come_from_the_schema():
    hp = algorithm_hparams()
    assert hp == AlgorithmConfig()
    assert algorithm_hparams(clip_cov_ratio=0.5).clip_cov_ratio == 0.5


def test_bench_script_runs_on_a_tiny_batch(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_losses.py"
    spec = importlib.util.spec_from_file_location("bench_losses", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--batch", "8", "--seq-len", "32", "--warmup", "0", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for row in ("megacov ppo", "megacov clip_cov", "megacov kl_cov", "reference-style kl_cov"):
        assert row in out
