"""The entropy-performance law R = -a * exp(H) + b and its use as a predictor.

Cui et al. (2025) found that, without entropy intervention, validation performance R and the mean
token entropy H of the policy on its training prompts follow R = -a * exp(H) + b, so performance
is capped at R = -a + b once entropy is exhausted (H -> 0), and a fit on the first few dozen steps
predicted the rest of training closely. This module fits that law and predicts from it.

The model is linear in (a, b) given x = exp(H), so ordinary least squares gives a unique starting
point; the final fit is a robust one (SciPy ``least_squares`` with a soft-L1 loss by default)
because eval metrics on small sets have outliers -- a bad eval step should not move the ceiling.
The residual scale that the robust loss needs is estimated from the OLS residuals (MAD), so the
loss adapts to the units of the metric (accuracy in [0, 1] or in percent alike).

Only numpy is imported at module level; SciPy is imported when a fit runs and matplotlib never, so
the trainer can call :func:`predict_ceiling` periodically without pulling in plotting.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

LOSSES = ("linear", "soft_l1", "huber", "cauchy", "arctan")
MIN_POINTS = 3
# Entropy spreads below this (nats) cannot separate a from b: exp(H) is then a constant column.
MIN_ENTROPY_SPREAD = 1e-6


class FitError(ValueError):
    """The data cannot support a fit (too few points, constant entropy); the message says which."""


@dataclass
class EntropyLawFit:
    """Fitted R = -a * exp(H) + b. ``r2`` is NaN when the metric itself is constant."""

    a: float
    b: float
    r2: float
    rmse: float
    n: int
    loss: str
    entropy: np.ndarray = field(repr=False)
    metric: np.ndarray = field(repr=False)

    @property
    def ceiling(self) -> float:
        """Performance at zero entropy, the law's upper bound: -a + b."""
        return -self.a + self.b

    def predict(self, entropy: Sequence[float] | np.ndarray) -> np.ndarray:
        return -self.a * np.exp(np.asarray(entropy, dtype=np.float64)) + self.b

    @property
    def residuals(self) -> np.ndarray:
        """Observed minus fitted metric at each fitted point."""
        return self.metric - self.predict(self.entropy)

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "ceiling": self.ceiling, "r2": self.r2, "rmse": self.rmse,
                "n": self.n, "loss": self.loss}


def _clean(entropy, metric) -> tuple[np.ndarray, np.ndarray]:
    h = np.asarray(entropy, dtype=np.float64).reshape(-1)
    r = np.asarray(metric, dtype=np.float64).reshape(-1)
    if h.shape != r.shape:
        raise FitError(f"entropy and metric have different lengths ({h.size} vs {r.size})")
    keep = np.isfinite(h) & np.isfinite(r)
    return h[keep], r[keep]


def _check(h: np.ndarray, r: np.ndarray, min_points: int) -> None:
    if h.size < max(min_points, MIN_POINTS):
        raise FitError(f"need at least {max(min_points, MIN_POINTS)} finite (entropy, metric) pairs, "
                       f"got {h.size}")
    if np.ptp(h) < MIN_ENTROPY_SPREAD:
        raise FitError(f"entropy is constant (spread {np.ptp(h):.3g} nats over {h.size} points), "
                       "so a and b cannot be told apart")


def fit_entropy_law(entropy, metric, *, loss: str = "soft_l1", f_scale: float | None = None,
                    min_points: int = MIN_POINTS) -> EntropyLawFit:
    """Fit R = -a * exp(H) + b on paired (H, R) values; non-finite pairs are dropped.

    ``entropy``/``metric``: 1-D, same length. ``f_scale`` is the residual size beyond which the
    robust loss stops being quadratic; by default 1.4826 * MAD of the OLS residuals.
    Raises FitError when fewer than ``min_points`` finite pairs remain or entropy does not vary.
    """
    if loss not in LOSSES:
        raise FitError(f"unknown loss '{loss}' (choose from {', '.join(LOSSES)})")
    h, r = _clean(entropy, metric)
    _check(h, r, min_points)
    x = np.exp(h)
    design = np.stack([-x, np.ones_like(x)], axis=1)
    (a0, b0), *_ = np.linalg.lstsq(design, r, rcond=None)
    a, b = float(a0), float(b0)
    if loss != "linear":
        a, b = _robust(x, r, a, b, loss, f_scale)
    fitted = -a * x + b
    resid = r - fitted
    ss_tot = float(np.sum((r - r.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid ** 2)) / ss_tot if ss_tot > 0 else math.nan
    rmse = float(np.sqrt(np.mean(resid ** 2)))
    return EntropyLawFit(a=a, b=b, r2=r2, rmse=rmse, n=int(h.size), loss=loss, entropy=h, metric=r)


def _robust(x: np.ndarray, r: np.ndarray, a0: float, b0: float, loss: str,
            f_scale: float | None) -> tuple[float, float]:
    from scipy.optimize import least_squares

    if f_scale is None:
        ols_resid = r - (-a0 * x + b0)
        mad = float(np.median(np.abs(ols_resid - np.median(ols_resid))))
        # An exact fit has MAD 0; keep the scale positive and tiny relative to the metric's range.
        f_scale = max(1.4826 * mad, 1e-9 * max(float(np.ptp(r)), float(np.abs(r).max()), 1e-12))
    design = np.stack([-x, np.ones_like(x)], axis=1)

    def residual(p: np.ndarray) -> np.ndarray:
        return design @ p - r

    def jacobian(p: np.ndarray) -> np.ndarray:
        del p
        return design

    sol = least_squares(residual, np.array([a0, b0]), jac=jacobian, loss=loss, f_scale=f_scale,
                        x_scale="jac", method="trf", xtol=1e-14, ftol=1e-14, gtol=1e-14, max_nfev=2000)
    return float(sol.x[0]), float(sol.x[1])


def predict_ceiling(entropies, metrics, *, loss: str = "soft_l1",
                    min_points: int = MIN_POINTS) -> dict | None:
    """Live use from the trainer: ``dict(a, b, ceiling, r2, n)`` from the pairs so far, or None.

    None (rather than an exception) when the pairs cannot support a fit yet -- too few finite points
    or entropy that has not moved -- because a periodic caller should simply try again later.
    """
    try:
        fit = fit_entropy_law(entropies, metrics, loss=loss, min_points=min_points)
    except FitError:
        return None
    return {"a": fit.a, "b": fit.b, "ceiling": fit.ceiling, "r2": fit.r2, "n": fit.n}


@dataclass
class Prediction:
    """A fit on the early steps and its errors on the later ones (errors = predicted - actual)."""

    fit: EntropyLawFit
    cutoff_step: float
    steps: np.ndarray
    entropy: np.ndarray
    actual: np.ndarray
    predicted: np.ndarray

    @property
    def errors(self) -> np.ndarray:
        return self.predicted - self.actual

    @property
    def rmse(self) -> float:
        return float(np.sqrt(np.mean(self.errors ** 2))) if self.errors.size else math.nan

    @property
    def mae(self) -> float:
        return float(np.mean(np.abs(self.errors))) if self.errors.size else math.nan

    @property
    def final_error(self) -> float:
        return float(self.errors[-1]) if self.errors.size else math.nan

    def as_dict(self) -> dict:
        return {
            "fit_until_step": self.cutoff_step, "n_fit": self.fit.n, "n_predicted": int(self.steps.size),
            "a": self.fit.a, "b": self.fit.b, "ceiling": self.fit.ceiling, "fit_r2": self.fit.r2,
            "rmse": self.rmse, "mae": self.mae,
            "final_step": float(self.steps[-1]) if self.steps.size else None,
            "final_actual": float(self.actual[-1]) if self.steps.size else None,
            "final_predicted": float(self.predicted[-1]) if self.steps.size else None,
            "final_error": self.final_error,
        }


def cutoff_step(steps: np.ndarray, fit_until: float) -> float:
    """The last step used for fitting: a float is a fraction in (0, 1) of the step span, an int a step.

    A fraction f means steps up to first + f * (last - first), so ``0.25`` is the first quarter of
    training whether steps count from 0 or from 1 and whatever the eval interval is.
    """
    steps = np.asarray(steps, dtype=np.float64)
    if isinstance(fit_until, (int, np.integer)) and not isinstance(fit_until, bool):
        return float(fit_until)
    fraction = float(fit_until)
    if not 0.0 < fraction < 1.0:
        raise FitError(f"fit-until fraction must be in (0, 1), got {fit_until} (give an integer for a step)")
    first, last = float(steps.min()), float(steps.max())
    return first + fraction * (last - first)


#: Fewer fitted points than this make a prediction that the report flags as unreliable.
MIN_RELIABLE_POINTS = 5


def metric_bounds(values) -> tuple[float, float] | None:
    """The range a metric can take, inferred from its values: [0, 1] for a rate (all values in it)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size and float(v.min()) >= 0.0 and float(v.max()) <= 1.0:
        return (0.0, 1.0)
    return None


def fit_and_predict(steps, entropy, metric, fit_until: float, *, loss: str = "soft_l1",
                    bounds: tuple[float, float] | None = None) -> Prediction:
    """Fit on pairs with step <= cutoff, predict the metric at the later steps from their entropy.

    The later steps' *observed* entropy is used, as in the paper: the law links the two quantities,
    it does not forecast entropy. ``bounds`` clips the predictions to the metric's range (an
    accuracy predicted below 0 is a fit artefact, not a forecast). Raises FitError if either side is
    empty or the fit is impossible.
    """
    s = np.asarray(steps, dtype=np.float64)
    h = np.asarray(entropy, dtype=np.float64)
    r = np.asarray(metric, dtype=np.float64)
    keep = np.isfinite(s) & np.isfinite(h) & np.isfinite(r)
    s, h, r = s[keep], h[keep], r[keep]
    if s.size == 0:
        raise FitError("no finite (step, entropy, metric) rows")
    order = np.argsort(s, kind="stable")
    s, h, r = s[order], h[order], r[order]
    cut = cutoff_step(s, fit_until)
    early = s <= cut
    if not early.any():
        raise FitError(f"no points at or before step {cut:g} to fit on")
    if early.all():
        raise FitError(f"no points after step {cut:g} to predict")
    fit = fit_entropy_law(h[early], r[early], loss=loss)
    late = ~early
    predicted = fit.predict(h[late])
    if bounds is not None:
        predicted = np.clip(predicted, bounds[0], bounds[1])
    return Prediction(fit=fit, cutoff_step=cut, steps=s[late], entropy=h[late], actual=r[late],
                      predicted=predicted)
