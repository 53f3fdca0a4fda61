"""Entropy controllers (adaptive coefficient, PAR schedules), KL estimators and the composed
actor objective."""
from __future__ import annotations

import math

import pytest
import torch

from megacov.algorithms import (
    LossNormalizer,
    actor_loss,
    algorithm_hparams,
    build_entropy_controller,
    kl_estimate,
    kl_reward_penalty,
    policy_loss,
)
from megacov.algorithms.entropy import Controls


def test_adaptive_coefficient_rule_and_resume():
    hp = algorithm_hparams(entropy_control="adaptive", entropy_coef=0.0, entropy_coef_delta=1e-3,
                           entropy_coef_min=0.0, entropy_coef_max=2.5e-3, entropy_target=0.5)
    ctl = build_entropy_controller(hp)
    seen = [ctl.step(entropy=h, step=i) for i, h in enumerate([0.4, 0.4, 0.4, 0.6, 0.4, 0.7, 0.7, 0.7])]
    coefs = [c.entropy_coef for c in seen]
    # below target: c rises by 1e-3 up to the 2.5e-3 cap and is applied; above: c falls, bonus off.
    expected = [1e-3, 2e-3, 2.5e-3, 0.0, 2.5e-3, 0.0, 0.0, 0.0]
    assert all(math.isclose(a, b, abs_tol=1e-15) for a, b in zip(coefs, expected)), coefs
    assert math.isclose(ctl.coef, 0.0, abs_tol=1e-15) and all(c.positive_weight == 1.0 for c in seen)
    ctl2 = build_entropy_controller(hp)
    ctl.step(entropy=0.1, step=8)
    ctl2.load_state_dict(ctl.state_dict())
    assert ctl2.step(entropy=0.1, step=9) == ctl.step(entropy=0.1, step=9)
    with pytest.raises(ValueError, match="entropy_control is 'par'"):
        build_entropy_controller(algorithm_hparams(entropy_control="par")).load_state_dict(ctl.state_dict())


def test_par_entropy_guided():
    hp = algorithm_hparams(entropy_control="par", par_schedule="entropy", par_lambda=1.0, par_delta=0.05,
                           entropy_target=0.3)
    ctl = build_entropy_controller(hp)
    lams = [ctl.step(entropy=h, step=i).positive_weight for i, h in enumerate([0.1] * 3 + [0.5] * 5)]
    expected = [0.95, 0.90, 0.85, 0.90, 0.95, 1.0, 1.0, 1.0]
    assert all(math.isclose(a, b, abs_tol=1e-12) for a, b in zip(lams, expected)), lams
    state = ctl.state_dict()
    other = build_entropy_controller(hp)
    other.load_state_dict(state)
    assert other.lam == ctl.lam
    low = build_entropy_controller(hp)
    for i in range(40):
        lam = low.step(entropy=0.0, step=i).positive_weight
    assert lam == 0.0


def test_par_epoch_and_stage_schedules():
    ep = build_entropy_controller(algorithm_hparams(entropy_control="par", par_schedule="epoch"), total_epochs=5)
    assert [ep.step(entropy=1.0, step=0, epoch=e).positive_weight for e in range(1, 6)] == [0, 0.25, 0.5, 0.75, 1]
    with pytest.raises(ValueError, match="total_epochs >= 2"):
        build_entropy_controller(algorithm_hparams(entropy_control="par", par_schedule="epoch"), total_epochs=1)
    st = build_entropy_controller(algorithm_hparams(
        entropy_control="par", par_schedule="stage", par_stage_steps=[10, 20], par_stage_lambdas=[0.2, 0.5, 1.0]))
    assert [st.step(entropy=0.0, step=s).positive_weight for s in (0, 9, 10, 19, 20, 99)] == [0.2, 0.2, 0.5, 0.5,
                                                                                              1.0, 1.0]
    const = build_entropy_controller(algorithm_hparams(entropy_control="par", par_schedule="stage", par_lambda=0.3))
    assert const.step(entropy=0.0, step=50).positive_weight == 0.3


def test_none_controller_uses_constant_coef():
    ctl = build_entropy_controller(algorithm_hparams(entropy_coef=1e-3))
    assert ctl.step(entropy=0.0, step=0) == Controls(entropy_coef=1e-3, positive_weight=1.0)


def test_kl_estimators_hand_values_and_gradients():
    lp = torch.tensor([[-1.0, -2.0, 5.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    d = [0.5, -1.0]
    expect = {"k1": d, "k2": [x * x / 2 for x in d], "k3": [math.exp(-x) - 1 + x for x in d]}
    dexp = {"k1": [1.0, 1.0], "k2": d, "k3": [1 - math.exp(-x) for x in d]}
    for est in ("k1", "k2", "k3"):
        kl = kl_estimate(lp, ref, mask, est)
        assert kl[0, 2] == 0.0
        torch.testing.assert_close(kl[0, :2], torch.tensor(expect[est], dtype=torch.float64))
        (g,) = torch.autograd.grad(kl.sum(), lp)
        torch.testing.assert_close(g[0], torch.tensor(dexp[est] + [0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(lp, ref, mask, "k4")


def test_kl_reward_penalty():
    lp = torch.tensor([[-1.0, -2.0, 5.0], [0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out, m = kl_reward_penalty(torch.tensor([1.0, 0.0]), lp, ref, mask, coef=0.1, estimator="k1")
    torch.testing.assert_close(out, torch.tensor([1.0 - 0.1 * (0.5 - 1.0), 0.0 - 0.1 * 1.0]))
    assert math.isclose(float(m["kl_reward_mean"]), (0.5 - 1.0 + 1.0) / 3, rel_tol=1e-6)


def _batch(seed=0, B=5, T=7):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    ent = torch.rand(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.8
    return lp, old, ref, adv, ent, mask


@pytest.mark.parametrize("name", ["ppo", "clip_cov", "kl_cov"])
def test_actor_loss_composes_terms(name):
    lp, old, ref, adv, ent, mask = _batch()
    hp = algorithm_hparams(policy_loss=name, kl_coef=0.05, kl_estimator="k3", loss_agg_mode="seq-mean-token-mean",
                           kl_cov_ratio=0.1, clip_cov_ratio=0.1, clip_cov_lb=0.0)
    norm = LossNormalizer.from_mask(mask)
    lam, coef = 0.3, 0.01
    x, e = lp.clone().requires_grad_(), ent.clone().requires_grad_()
    total, m = actor_loss(x, old, adv, mask, hp=hp, norm=norm, entropy=e, ref_log_prob=ref,
                          controls=Controls(entropy_coef=coef, positive_weight=lam))
    total.backward()
    # Reference: the same pieces written out; PAR scales exactly the A > 0 tokens' policy loss.
    y, f = lp.clone().requires_grad_(), ent.clone().requires_grad_()
    weights = torch.where(adv > 0, lam, 1.0)
    pg, _ = policy_loss(name, y, old, adv, mask, weights=weights, **{k: getattr(hp, k) for k in (
        "loss_agg_mode", "kl_cov_ratio", "clip_cov_ratio", "clip_cov_lb")})
    mean_ent = sum((f[b][mask[b]].sum() / mask[b].sum()) for b in range(5) if mask[b].any()) / norm.num_seqs
    d = (y - ref)[mask]
    kl_tok = torch.zeros_like(y)
    kl_tok[mask] = torch.exp(-d) - 1 + d
    kl = sum((kl_tok[b][mask[b]].sum() / mask[b].sum()) for b in range(5) if mask[b].any()) / norm.num_seqs
    expected = pg - coef * mean_ent + 0.05 * kl
    expected.backward()
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(x.grad, y.grad)
    torch.testing.assert_close(e.grad, f.grad)
    assert {"entropy_bonus", "kl_loss", "total_loss", "pg_loss"} <= set(m)


def test_par_weight_changes_only_positive_tokens():
    lp, old, _, adv, _, mask = _batch(3)
    hp = algorithm_hparams()
    norm = LossNormalizer.from_mask(mask)
    grads = []
    for lam in (1.0, 0.0):
        x = lp.clone().requires_grad_()
        loss, _ = actor_loss(x, old, adv, mask, hp=hp, norm=norm, controls=Controls(0.0, lam))
        loss.backward()
        grads.append(x.grad)
    pos = (adv > 0) & mask
    assert torch.equal(grads[0][~pos], grads[1][~pos])
    assert not bool(grads[1][pos].any()) and bool(grads[0][pos].any())


def test_actor_loss_missing_inputs_are_clear():
    lp, old, _, adv, _, mask = _batch()
    norm = LossNormalizer.from_mask(mask)
    with pytest.raises(ValueError, match="no entropy tensor"):
        actor_loss(lp, old, adv, mask, hp=algorithm_hparams(entropy_coef=0.1), norm=norm)
    with pytest.raises(ValueError, match="ref_log_prob"):
        actor_loss(lp, old, adv, mask, hp=algorithm_hparams(kl_coef=0.1), norm=norm)
    # folded into the reward: the loss needs no reference
    actor_loss(lp, old, adv, mask, hp=algorithm_hparams(kl_coef=0.1, use_kl_in_reward=True), norm=norm)
