"""The entropy-law fit: parameter recovery on curves with known (a, b), robustness, prediction errors
checked against direct computation, and the degenerate inputs a live caller will meet."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from megacov.analysis.fit import FitError, cutoff_step, fit_and_predict, fit_entropy_law, predict_ceiling

A_TRUE, B_TRUE = 0.04, 0.72


def _curve(n: int = 60, noise: float = 0.004, seed: int = 0, a: float = A_TRUE, b: float = B_TRUE):
    rng = np.random.default_rng(seed)
    steps = np.arange(1, n + 1, dtype=np.float64) * 5
    h = 0.05 + 1.55 * np.exp(-steps / 120.0)
    r = -a * np.exp(h) + b + rng.normal(0.0, noise, n)
    return steps, h, r


def _ols_standard_errors(h: np.ndarray, noise: float) -> tuple[float, float]:
    """Standard errors of (a, b) for Gaussian noise of known size: sqrt(diag(sigma^2 (X'X)^-1))."""
    x = np.stack([-np.exp(h), np.ones_like(h)], axis=1)
    cov = noise ** 2 * np.linalg.inv(x.T @ x)
    return math.sqrt(cov[0, 0]), math.sqrt(cov[1, 1])


def test_noise_free_curve_is_recovered_exactly():
    _, h, _ = _curve(noise=0.0)
    r = -A_TRUE * np.exp(h) + B_TRUE
    fit = fit_entropy_law(h, r)
    assert fit.a == pytest.approx(A_TRUE, abs=1e-9)
    assert fit.b == pytest.approx(B_TRUE, abs=1e-9)
    assert fit.ceiling == pytest.approx(B_TRUE - A_TRUE, abs=1e-9)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("loss", ["soft_l1", "huber", "linear"])
def test_noisy_curves_recover_parameters_within_their_standard_errors(loss):
    """Tolerance: 4.5 standard errors of the estimator (computed from the design and the noise) per
    seed over 20 seeds, and 10% of a / 1% of b in absolute terms."""
    noise = 0.004
    for seed in range(20):
        _, h, r = _curve(noise=noise, seed=seed)
        se_a, se_b = _ols_standard_errors(h, noise)
        fit = fit_entropy_law(h, r, loss=loss)
        assert abs(fit.a - A_TRUE) < 4.5 * se_a, (seed, fit.a, se_a)
        assert abs(fit.b - B_TRUE) < 4.5 * se_b, (seed, fit.b, se_b)
        assert abs(fit.a - A_TRUE) < 0.1 * A_TRUE
        assert abs(fit.b - B_TRUE) < 0.01 * B_TRUE
        assert fit.n == h.size
        np.testing.assert_allclose(fit.residuals, r - (-fit.a * np.exp(h) + fit.b), atol=1e-15)


def test_linear_loss_matches_polyfit():
    _, h, r = _curve(seed=3)
    slope, intercept = np.polyfit(np.exp(h), r, 1)
    fit = fit_entropy_law(h, r, loss="linear")
    assert fit.a == pytest.approx(-slope, rel=1e-9)
    assert fit.b == pytest.approx(intercept, rel=1e-9)
    resid = r - (slope * np.exp(h) + intercept)
    assert fit.r2 == pytest.approx(1 - np.sum(resid ** 2) / np.sum((r - r.mean()) ** 2), rel=1e-9)
    assert fit.rmse == pytest.approx(np.sqrt(np.mean(resid ** 2)), rel=1e-9)


def test_robust_loss_ignores_broken_eval_steps_that_move_least_squares():
    _, h, r = _curve(seed=4)
    r = r.copy()
    r[[10, 25, 40]] = 0.0  # three failed evals logged as 0 accuracy
    robust = fit_entropy_law(h, r, loss="soft_l1")
    plain = fit_entropy_law(h, r, loss="linear")
    assert abs(robust.ceiling - (B_TRUE - A_TRUE)) < 0.01
    assert abs(plain.ceiling - (B_TRUE - A_TRUE)) > 0.03  # the scenario really does hurt OLS


def test_fit_is_unit_free():
    """Accuracy in percent gives 100x the parameters: the robust scale adapts to the metric's units."""
    _, h, r = _curve(seed=5)
    frac = fit_entropy_law(h, r)
    pct = fit_entropy_law(h, 100 * r)
    assert pct.a == pytest.approx(100 * frac.a, rel=1e-5)
    assert pct.b == pytest.approx(100 * frac.b, rel=1e-5)


def test_prediction_errors_match_direct_computation():
    steps, h, r = _curve(n=80, seed=6)
    pred = fit_and_predict(steps, h, r, 0.25, loss="linear")
    cut = steps[0] + 0.25 * (steps[-1] - steps[0])
    early, late = steps <= cut, steps > cut
    slope, intercept = np.polyfit(np.exp(h[early]), r[early], 1)
    direct = slope * np.exp(h[late]) + intercept
    err = direct - r[late]
    assert pred.cutoff_step == pytest.approx(cut)
    assert pred.fit.n == int(early.sum())
    np.testing.assert_array_equal(pred.steps, steps[late])
    np.testing.assert_allclose(pred.predicted, direct, rtol=1e-9)
    assert pred.rmse == pytest.approx(math.sqrt(np.mean(err ** 2)), rel=1e-8)
    assert pred.mae == pytest.approx(np.mean(np.abs(err)), rel=1e-8)
    assert pred.final_error == pytest.approx(err[-1], rel=1e-8, abs=1e-12)
    d = pred.as_dict()
    assert d["final_step"] == steps[-1] and d["n_predicted"] == int(late.sum())
    # The law holds exactly here (up to noise), so predictions are as good as the noise allows.
    assert pred.rmse < 3 * 0.004


def test_integer_fit_until_is_a_step_and_fraction_is_a_span():
    steps = np.arange(0, 101, dtype=np.float64)
    assert cutoff_step(steps, 36) == 36.0
    assert cutoff_step(steps, 0.25) == 25.0
    assert cutoff_step(steps + 1, 0.25) == 26.0
    with pytest.raises(FitError, match="fraction"):
        cutoff_step(steps, 1.5)
    s, h, r = _curve(n=40, seed=7)
    pred = fit_and_predict(s, h, r, 36)  # steps are 5, 10, ...: 7 points at or before step 36
    assert pred.fit.n == 7 and pred.steps[0] == 40.0


def test_prediction_needs_points_on_both_sides():
    s, h, r = _curve(n=20)
    with pytest.raises(FitError, match="no points after"):
        fit_and_predict(s, h, r, 10_000)
    with pytest.raises(FitError, match="no points at or before"):
        fit_and_predict(s, h, r, 1)


def test_degenerate_inputs():
    _, h, r = _curve(n=10)
    with pytest.raises(FitError, match="constant"):
        fit_entropy_law(np.full(10, 0.7), r)
    with pytest.raises(FitError, match="at least 3"):
        fit_entropy_law(h[:2], r[:2])
    with pytest.raises(FitError, match="different lengths"):
        fit_entropy_law(h, r[:-1])
    with pytest.raises(FitError, match="unknown loss"):
        fit_entropy_law(h, r, loss="l2")
    # Constant metric: a fit exists (a = 0) but R^2 is undefined, not 1 or -inf.
    flat = fit_entropy_law(h, np.full(10, 0.5), loss="linear")
    assert flat.a == pytest.approx(0.0, abs=1e-12) and math.isnan(flat.r2)


def test_non_finite_pairs_are_dropped_not_propagated():
    _, h, r = _curve(n=30, seed=8)
    h_bad, r_bad = h.copy(), r.copy()
    h_bad[[3, 7]] = np.nan
    r_bad[[12]] = np.inf
    r_bad[[20]] = np.nan
    keep = np.ones(30, bool)
    keep[[3, 7, 12, 20]] = False
    dirty = fit_entropy_law(h_bad, r_bad)
    clean = fit_entropy_law(h[keep], r[keep])
    assert dirty.n == 26
    assert dirty.a == pytest.approx(clean.a, rel=1e-12) and dirty.b == pytest.approx(clean.b, rel=1e-12)


def test_predict_ceiling_for_live_use():
    _, h, r = _curve(seed=9)
    out = predict_ceiling(h.tolist(), r.tolist())
    assert set(out) == {"a", "b", "ceiling", "r2", "n"}
    assert out["ceiling"] == pytest.approx(out["b"] - out["a"])
    assert abs(out["ceiling"] - (B_TRUE - A_TRUE)) < 0.01
    assert predict_ceiling([], []) is None
    assert predict_ceiling([0.5, 0.4], [0.1, 0.2]) is None
    assert predict_ceiling([0.5, float("nan"), 0.4, 0.3], [0.1, 0.2, float("nan"), 0.3]) is None
    assert predict_ceiling([0.5] * 8, list(range(8))) is None
    assert predict_ceiling(h, r, min_points=len(h) + 1) is None


def test_live_predictor_does_not_import_plotting_or_heavy_frameworks():
    code = ("import sys, numpy as np; from megacov.analysis.fit import predict_ceiling; "
            "h = np.linspace(1.5, 0.1, 12); print(predict_ceiling(h, -0.1 * np.exp(h) + 0.8)['ceiling']); "
            "bad = [m for m in ('matplotlib', 'torch', 'vllm', 'ray', 'megatron') if m in sys.modules]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True).stdout.split("\n")
    assert float(out[0]) == pytest.approx(0.7, abs=1e-9)
    assert out[1] == "[]"
