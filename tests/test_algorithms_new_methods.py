"""GSPO, CISPO, the high-entropy tokens, rollout correction (TIS / MIS) and entropy-shaped
advantages against independent float64 transcriptions of their papers' formulas: values and
gradients, ragged masks, every aggregation mode that applies.

The transcriptions below are written from the formulas (sums over explicit Python loops where
that is clearer), not from the library code: agreement to float64 rounding is the claim.
"""
from __future__ import annotations

import math

import pytest
import torch

from megacov.algorithms import AGG_MODES, actor_loss, algorithm_hparams, policy_loss
from megacov.algorithms import selection as sel
from megacov.algorithms.losses import LossNormalizer, loss_selection
from megacov.algorithms.rollout_correction import rollout_correction
from megacov.algorithms.shaping import entropy_advantage

B, T = 6, 9


def _data(seed: int, token_adv: bool = False):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T)
    for r in range(B):
        start = int(torch.randint(0, 3, (1,), generator=g))
        mask[r, start:start + int(torch.randint(1, T - start + 1, (1,), generator=g))] = 1
    mask[3] = 0  # a sequence without valid tokens
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    if token_adv:
        adv = adv + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    # padding holds garbage that must never leak
    lp = torch.where(mask.bool(), lp, torch.full_like(lp, float("nan")))
    return lp, old, adv * mask, mask, ent


def _agg(per_token: list[list[torch.Tensor]], mode: str, max_len: int) -> torch.Tensor:
    """Aggregation written out: per_token[i] holds the valid-token terms of sequence i."""
    seqs = [terms for terms in per_token if terms]
    n_tok = sum(len(t) for t in seqs)
    if mode == "token-mean":
        return sum(sum(t) for t in seqs) / n_tok
    if mode == "seq-mean-token-sum":
        return sum(sum(t) for t in seqs) / len(seqs)
    if mode == "seq-mean-token-mean":
        return sum(sum(t) / len(t) for t in seqs) / len(seqs)
    return sum(sum(t) for t in seqs) / (len(seqs) * max_len)


def _valid(mask: torch.Tensor, i: int) -> list[int]:
    return [t for t in range(T) if mask[i, t] > 0]


def _leaf(lp: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(lp, nan=0.0).clone().requires_grad_()


def _ours(name: str, lp, old, adv, mask, **hp):
    x = _leaf(lp)
    loss, metrics = policy_loss(name, torch.where(mask.bool(), x, lp), old, adv, mask, **hp)
    loss.backward()
    return loss.detach(), x.grad, metrics


def _theirs(fn, lp, mask):
    x = _leaf(lp)
    loss = fn(x)
    loss.backward()
    return loss.detach(), torch.where(mask.bool(), x.grad, torch.zeros_like(x.grad))


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-13), (a, b)


# ----------------------------------------------------------------------------------------------
# GSPO (arXiv 2507.18071)
# ----------------------------------------------------------------------------------------------


def _gspo_paper(x, old, adv, mask, lo, hi):
    """J = 1/G sum_i min(s_i A_i, clip(s_i, 1 - lo, 1 + hi) A_i), s_i = exp(mean_t log(pi/pi_old))."""
    total, groups = 0.0, 0
    for i in range(B):
        ts = _valid(mask, i)
        if not ts:
            continue
        s = torch.exp(sum(x[i, t] - old[i, t] for t in ts) / len(ts))
        a = adv[i, ts[0]]
        total = total + torch.minimum(s * a, torch.clamp(s, 1 - lo, 1 + hi) * a)
        groups += 1
    return -total / groups


def _gspo_token(x, old, adv, mask, lo, hi, mode):
    """GSPO-token: s_it = sg(s_i) pi_t / sg(pi_t); per token min(s_it A_it, clip(s_it) A_it)."""
    terms = []
    for i in range(B):
        ts = _valid(mask, i)
        s_i = torch.exp(sum(x[i, t] - old[i, t] for t in ts) / len(ts)).detach() if ts else None
        row = []
        for t in ts:
            s_it = s_i * torch.exp(x[i, t] - x[i, t].detach())
            a = adv[i, t]
            row.append(-torch.minimum(s_it * a, torch.clamp(s_it, 1 - lo, 1 + hi) * a))
        terms.append(row)
    return _agg(terms, mode, T)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_equals_the_paper_objective(seed):
    """Sequence advantages, seq-mean-token-mean (the paper's normalisation): value and gradient
    equal GSPO's sequence-level objective; a range wide enough that some sequences clip."""
    lp, old, adv, mask, _ = _data(seed)
    for lo, hi in ((0.05, 0.08), (3e-4, 4e-4)):
        loss, grad, met = _ours("gspo", lp, old, adv, mask, gspo_clip_ratio_low=lo, gspo_clip_ratio_high=hi,
                                loss_agg_mode="seq-mean-token-mean")
        want, want_grad = _theirs(lambda x: _gspo_paper(x, old, adv, mask, lo, hi), lp, mask)
        _close(loss, want)
        _close(grad, want_grad)
        if lo == 0.05:
            assert 0 < float(met["clipfrac"]) < 1  # both branches exercised


@pytest.mark.parametrize("mode", AGG_MODES)
def test_gspo_token_form_every_aggregation(mode):
    lp, old, adv, mask, _ = _data(3, token_adv=True)
    loss, grad, _ = _ours("gspo", lp, old, adv, mask, gspo_clip_ratio_low=0.05, gspo_clip_ratio_high=0.08,
                          loss_agg_mode=mode)
    want, want_grad = _theirs(lambda x: _gspo_token(x, old, adv, mask, 0.05, 0.08, mode), lp, mask)
    _close(loss, want)
    _close(grad, want_grad)


# ----------------------------------------------------------------------------------------------
# CISPO (arXiv 2506.13585)
# ----------------------------------------------------------------------------------------------


def _cispo_paper(x, old, adv, mask, lo, hi, mode):
    """J = sum_i sum_t sg(clip(r_it, 1 - lo, 1 + hi)) A_it log pi_theta(o_it), normalised by mode."""
    terms = []
    for i in range(B):
        row = []
        for t in _valid(mask, i):
            r = torch.exp(x[i, t] - old[i, t]).detach()
            row.append(-torch.clamp(r, 1 - lo, 1 + hi) * adv[i, t] * x[i, t])
        terms.append(row)
    return _agg(terms, mode, T)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("lo,hi", [(1.0, 0.28), (0.1, 0.1)])
def test_cispo_equals_the_paper_objective(mode, lo, hi):
    lp, old, adv, mask, _ = _data(4, token_adv=True)
    loss, grad, met = _ours("cispo", lp, old, adv, mask, cispo_clip_ratio_low=lo, cispo_clip_ratio_high=hi,
                            loss_agg_mode=mode)
    want, want_grad = _theirs(lambda x: _cispo_paper(x, old, adv, mask, lo, hi, mode), lp, mask)
    _close(loss, want)
    _close(grad, want_grad)
    m = mask.bool()
    r = torch.exp(torch.nan_to_num(lp) - old)
    truncated = (((r < 1 - lo) | (r > 1 + hi)) & m).sum().double() / m.sum()
    assert abs(float(met["clipfrac"]) - float(truncated)) < 1e-12 and float(truncated) > 0


def test_cispo_keeps_a_gradient_on_every_token():
    """Where PPO's clipped branch stops a token's gradient, CISPO's does not (the paper's point)."""
    lp, old, adv, mask, _ = _data(5)
    _, g_ppo, _ = _ours("ppo", lp, old, adv, mask, clip_ratio_low=0.1, clip_ratio_high=0.1)
    _, g_cispo, _ = _ours("cispo", lp, old, adv, mask, cispo_clip_ratio_low=0.1, cispo_clip_ratio_high=0.1)
    m = mask.bool() & (adv != 0)
    assert bool((g_ppo[m] == 0).any())
    assert bool((g_cispo[m] != 0).all())


# ----------------------------------------------------------------------------------------------
# high-entropy tokens (arXiv 2506.01939)
# ----------------------------------------------------------------------------------------------


def _forking_ppo(x, old, adv, ent, mask, rho, mode, eps=(0.2, 0.28)):
    """J = sum_i sum_t 1[H_it >= tau] min(r A, clip(r) A), tau the batch's (1 - rho) quantile of H
    over valid tokens; every valid token stays in the normaliser."""
    tau = torch.quantile(ent[mask.bool()], 1 - rho)
    terms = []
    for i in range(B):
        row = []
        for t in _valid(mask, i):
            r = torch.exp(x[i, t] - old[i, t])
            a = adv[i, t]
            keep = float(ent[i, t] >= tau)
            row.append(-keep * torch.minimum(r * a, torch.clamp(r, 1 - eps[0], 1 + eps[1]) * a))
        terms.append(row)
    return _agg(terms, mode, T)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("rho", [0.2, 0.5, 1.0])
def test_high_entropy_tokens_equal_the_paper_rule(mode, rho):
    lp, old, adv, mask, ent = _data(6, token_adv=True)
    hp = algorithm_hparams(policy_loss="ppo", entropy_top_ratio=rho, loss_agg_mode=mode)
    x = _leaf(lp)
    loss, met = actor_loss(torch.where(mask.bool(), x, lp), old, adv, mask, hp=hp,
                           norm=LossNormalizer.from_mask(mask), entropy=ent)
    loss.backward()
    want, want_grad = _theirs(lambda y: _forking_ppo(y, old, adv, ent, mask, rho, mode), lp, mask)
    _close(loss.detach(), want)
    _close(x.grad, want_grad)
    tau = torch.quantile(ent[mask.bool()], 1 - rho)
    assert torch.equal(met["he_selected"], (ent >= tau) & mask.bool())
    assert abs(float(met["he_entropy_min"]) - float(ent[met["he_selected"]].min())) == 0


def test_high_entropy_count_is_the_quantile_count():
    """n - ceil((1 - rho)(n - 1)) tokens lie at or above torch.quantile's (1 - rho) quantile."""
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 7, 10, 99, 100, 101, 1000):
        h = torch.rand(n, generator=g, dtype=torch.float64)
        for rho in (0.01, 0.1, 0.2, 0.25, 0.5, 0.8, 1.0):
            assert sel.high_entropy_count(n, rho) == int((h >= torch.quantile(h, 1 - rho)).sum()), (n, rho)
    assert sel.high_entropy_count(0, 0.2) == 0


def test_high_entropy_combines_with_selecting_losses():
    """On top of Clip-Cov / KL-Cov the two choices compose: a token trains only when kept by the
    entropy rule and (Clip-Cov) not detached."""
    lp, old, adv, mask, ent = _data(7)
    lp = torch.nan_to_num(lp)
    for loss_name in ("clip_cov", "kl_cov"):
        hp = algorithm_hparams(policy_loss=loss_name, entropy_top_ratio=0.5, clip_cov_lb=-10.0, clip_cov_ratio=0.2,
                               kl_cov_ratio=0.2)
        x = lp.clone().requires_grad_()
        loss, met = actor_loss(x, old, adv, mask, hp=hp, norm=LossNormalizer.from_mask(mask), entropy=ent)
        loss.backward()
        dropped = mask.bool() & ~met["he_selected"]
        assert bool(dropped.any()) and bool((x.grad[dropped] == 0).all())
        assert int(met["selected_count"]) > 0 and loss_selection(loss_name) == loss_name


# ----------------------------------------------------------------------------------------------
# rollout correction (TIS / MIS) and entropy-shaped advantages
# ----------------------------------------------------------------------------------------------


def _rollout(seed: int):
    lp, old, adv, mask, _ = _data(seed)
    g = torch.Generator().manual_seed(seed + 100)
    rollout = old + 0.8 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return torch.nan_to_num(lp), old, rollout, adv, mask


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_tis_weights_and_gradient(level):
    lp, old, rollout, adv, mask = _rollout(8)
    hp = algorithm_hparams(rollout_correction="tis", rollout_correction_level=level, rollout_is_cap=1.5)
    corr = rollout_correction(old, rollout, mask, hp)
    n_trunc, n = 0, int(mask.sum())
    for i in range(B):
        ts = _valid(mask, i)
        seq_w = math.exp(sum(float(old[i, t] - rollout[i, t]) for t in ts))
        for t in ts:
            w = seq_w if level == "sequence" else math.exp(float(old[i, t] - rollout[i, t]))
            assert abs(float(corr.weight[i, t]) - min(w, 1.5)) <= 1e-6 * min(w, 1.5)
            n_trunc += w > 1.5
    assert torch.equal(corr.mask, mask.bool())
    assert corr.metrics["rollout_corr/truncated_frac"] == n_trunc / n and 0 < n_trunc < n
    # the loss: every PPO token term times its weight (token-mean)
    hp_loss = algorithm_hparams(policy_loss="ppo")
    x = lp.clone().requires_grad_()
    loss, _ = actor_loss(x, old, adv, mask, hp=hp_loss, norm=LossNormalizer.from_mask(mask),
                         loss_weight=corr.weight.double())
    loss.backward()

    def paper(y):
        terms = []
        for i in range(B):
            row = []
            for t in _valid(mask, i):
                r = torch.exp(y[i, t] - old[i, t])
                a = adv[i, t]
                row.append(-corr.weight[i, t].double() * torch.minimum(r * a, torch.clamp(r, 0.8, 1.28) * a))
            terms.append(row)
        return _agg(terms, "token-mean", T)

    want, want_grad = _theirs(paper, lp, mask)
    _close(loss.detach(), want)
    _close(x.grad, want_grad)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_mis_masks_out_of_band(level):
    lp, old, rollout, adv, mask = _rollout(9)
    hp = algorithm_hparams(rollout_correction="mis", rollout_correction_level=level, rollout_mis_low=0.6,
                           rollout_mis_high=1.6)
    corr = rollout_correction(old, rollout, mask, hp)
    assert corr.weight is None
    dropped = 0
    for i in range(B):
        ts = _valid(mask, i)
        seq_w = math.exp(sum(float(old[i, t] - rollout[i, t]) for t in ts))
        for t in range(T):
            w = seq_w if level == "sequence" else math.exp(float(old[i, t] - rollout[i, t]))
            keep = t in ts and 0.6 <= w <= 1.6
            assert bool(corr.mask[i, t]) == keep
            dropped += t in ts and not keep
    assert corr.metrics["rollout_corr/masked_frac"] == dropped / int(mask.sum()) and dropped > 0
    if level == "sequence":  # whole responses leave together
        for i in range(B):
            assert not corr.mask[i].any() or torch.equal(corr.mask[i], mask[i].bool())


def test_rollout_correction_none_and_errors():
    lp, old, rollout, adv, mask = _rollout(10)
    corr = rollout_correction(old, rollout, mask, algorithm_hparams())
    assert corr.weight is None and torch.equal(corr.mask, mask.bool()) and corr.metrics == {}
    with pytest.raises(ValueError, match="rollout log-probs"):
        rollout_correction(old, None, mask, algorithm_hparams(rollout_correction="tis"))


def test_entropy_advantage_equals_the_paper():
    """A' = A + min(alpha H, |A| / kappa) on valid tokens, 0 on padding."""
    _, _, adv, mask, ent = _data(11, token_adv=True)
    shaped, met = entropy_advantage(adv, ent, mask, coef=0.4, kappa=2.0)
    clipped = 0
    for i in range(B):
        for t in range(T):
            if mask[i, t] == 0:
                assert shaped[i, t] == 0
                continue
            bonus = min(0.4 * float(ent[i, t]), abs(float(adv[i, t])) / 2.0)
            clipped += 0.4 * float(ent[i, t]) > abs(float(adv[i, t])) / 2.0
            assert abs(float(shaped[i, t]) - (float(adv[i, t]) + bonus)) < 1e-12
    assert 0 < clipped and met["actor/entropy_adv_clipped_frac"] == clipped / int(mask.sum())
    same, none = entropy_advantage(adv, ent, mask, coef=0.0, kappa=2.0)
    assert same is adv and none == {}


def test_parallel_layer_names_no_loss():
    """The parallel layer computes any registered rule: no loss or rule name appears in it."""
    import inspect

    import megacov.parallel.actor as actor
    import megacov.parallel.selection as psel

    for module in (psel, actor):
        code = inspect.getsource(module)
        for name in ("clip_cov", "kl_cov", "gspo", "cispo"):
            assert f'"{name}"' not in code, (module.__name__, name)


def test_ppo_skips_the_covariance_unless_asked():
    lp, old, adv, mask, _ = _data(12)
    _, _, plain = _ours("ppo", lp, old, adv, mask)
    assert not any(k.startswith("cov_") for k in plain)
    _, _, asked = _ours("ppo", lp, old, adv, mask, cov_metrics=True)
    assert {"cov_mean", "cov_max", "cov_q50"} <= set(asked)
