"""Entropy dynamics of a run: how fast entropy falls, how much of the change happens early, and what
the covariance-based controllers (Clip-Cov / KL-Cov) saw and touched.

The paper's observation to check is that most of the entropy drop and most of the performance gain
happen in the first few percent of steps. Per-step metrics are noisy (a few hundred responses per
step), so levels are read from a lightly smoothed curve: a centred moving average over about 5% of
the points, interpolated linearly in the step. Phase changes are then differences of levels at the
phase boundaries, which makes them add up exactly to the total change.

Start and end levels are means over the first and last 10% of the points, and a change counts only
when it exceeds twice its standard error (the point-to-point noise around the smoothed curve, scaled
by the number of points averaged): shares of a change that is noise are reported as None ("no
significant change") instead of ratios like 4.25 of nothing.
"""
from __future__ import annotations

import math

import numpy as np

from megacov.analysis.runs import RunMetrics

COV_KEYS = ("cov/mean", "cov/std", "cov/max", "cov/selected_mean", "cov/num_selected")


def smooth(values: np.ndarray, window: int | None = None) -> np.ndarray:
    """Centred moving average; the window shrinks at the ends instead of padding with guesses."""
    v = np.asarray(values, dtype=np.float64)
    n = v.size
    w = max(1, n // 20) if window is None else max(1, int(window))
    half = w // 2
    if half == 0:
        return v.copy()
    csum = np.concatenate([[0.0], np.cumsum(v)])
    lo = np.clip(np.arange(n) - half, 0, n)
    hi = np.clip(np.arange(n) + half + 1, 0, n)
    return (csum[hi] - csum[lo]) / (hi - lo)


def level_at(steps: np.ndarray, values: np.ndarray, at: float, window: int | None = None) -> float:
    """The smoothed curve's value at step ``at`` (linear interpolation between logged steps)."""
    return float(np.interp(at, steps, smooth(values, window)))


#: Fraction of the points averaged for the start and end levels.
LEVEL_FRAC = 0.1
#: A change is significant above this many standard errors.
SIGNIFICANCE_SE = 2.0


def noise_sd(values: np.ndarray) -> float:
    """Robust point-to-point noise: scaled MAD of the residuals around a ~10%-wide moving average."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 3:
        return math.nan
    w = max(3, v.size // 10)
    resid = v - smooth(v, w)
    mad = float(np.median(np.abs(resid - np.median(resid))))
    return 1.4826 * mad / math.sqrt(max(1.0 - 1.0 / w, 1e-9))


def levels(values: np.ndarray, frac: float = LEVEL_FRAC) -> dict | None:
    """Start / end levels (means of the first / last ``frac`` of the points), the change, its standard
    error and whether it is significant (> ``SIGNIFICANCE_SE`` standard errors)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return None
    k = max(1, math.ceil(frac * v.size))
    start, end = float(v[:k].mean()), float(v[-k:].mean())
    sd = noise_sd(v)
    se = sd * math.sqrt(2.0 / k) if math.isfinite(sd) else math.nan
    change = end - start
    scale = max(float(np.abs(v).max()), 1e-12)
    moved = abs(change) > 1e-9 * scale
    significant = bool(moved and (not math.isfinite(se) or abs(change) > SIGNIFICANCE_SE * se))
    return {"start": start, "end": end, "points": k, "change": change, "se": se,
            "ratio": end / start if abs(start) > 1e-12 else None, "significant": significant}


def _share(part: float, total: float, magnitude: float, significant: bool = True) -> float | None:
    # A curve that did not move (total change at rounding level relative to its values, or within
    # its noise) has no meaningful share; say so with None rather than a ratio of noise.
    return part / total if significant and abs(total) > 1e-9 * max(magnitude, 1e-12) else None


def phase_changes(steps, values, n_phases: int = 4, window: int | None = None) -> list[dict]:
    """Change of the smoothed curve over ``n_phases`` equal spans of steps, and each one's share.

    Returns ``[{phase, step_start, step_end, start, end, change, share}]``; empty with < 2 points.
    """
    s = np.asarray(steps, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if s.size < 2 or n_phases < 1:
        return []
    sm = smooth(v, window)
    bounds = np.linspace(s[0], s[-1], n_phases + 1)
    at = np.interp(bounds, s, sm)
    total = float(at[-1] - at[0])
    sig = _significant(v)
    phases = []
    for i in range(n_phases):
        change = float(at[i + 1] - at[i])
        phases.append({"phase": i + 1, "step_start": float(bounds[i]), "step_end": float(bounds[i + 1]),
                       "start": float(at[i]), "end": float(at[i + 1]), "change": change,
                       "share": _share(change, total, float(np.abs(v).max()), sig)})
    return phases


def _significant(v: np.ndarray) -> bool:
    lv = levels(v)
    return bool(lv is None or lv["significant"])


def early_share(steps, values, early_frac: float = 0.1, window: int | None = None) -> dict | None:
    """Share of the total change of the smoothed curve that happened by ``early_frac`` of the steps."""
    s = np.asarray(steps, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if s.size < 2:
        return None
    sm = smooth(v, window)
    cut = float(s[0] + early_frac * (s[-1] - s[0]))
    start, at_cut, end = (float(x) for x in np.interp([s[0], cut, s[-1]], s, sm))
    return {"early_frac": early_frac, "until_step": cut, "start": start, "at_cut": at_cut, "end": end,
            "early_change": at_cut - start, "total_change": end - start,
            "share": _share(at_cut - start, end - start, float(np.abs(v).max()), _significant(v))}


def series_summary(steps, values, *, early_frac: float = 0.1, n_phases: int = 4) -> dict | None:
    """First/last/min/max, start/end levels with the change's significance, the early share and the
    per-phase changes."""
    s = np.asarray(steps, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if s.size == 0:
        return None
    out = {"n": int(s.size), "first_step": float(s[0]), "last_step": float(s[-1]),
           "first": float(v[0]), "last": float(v[-1]), "min": float(v.min()), "max": float(v.max()),
           "levels": levels(v), "early": early_share(s, v, early_frac), "phases": phase_changes(s, v, n_phases)}
    return out


def cov_summary(run: RunMetrics, n_phases: int = 4) -> dict | None:
    """Means of the covariance statistics over the run (and per phase), and the tokens touched.

    ``selected_over_all`` compares the mean covariance of the tokens Clip-Cov/KL-Cov selected with
    that of all tokens: the controllers are meant to pick the extreme upper tail, so it should be
    far above 1. ``tokens_touched`` sums ``cov/num_selected`` over steps.
    """
    present = [k for k in COV_KEYS if run.count(k) > 0]
    if not present:
        return None
    out: dict = {"keys": present}
    for key in present:
        s, v = run.series(key)
        short = key.split("/", 1)[1]
        out[f"{short}_mean_over_steps"] = float(v.mean())
        bounds = np.linspace(s[0], s[-1], n_phases + 1)
        out[f"{short}_by_phase"] = [
            _mean_or_none(v[(s >= bounds[i]) & ((s < bounds[i + 1]) | (i == n_phases - 1))])
            for i in range(n_phases)]
    if "cov/num_selected" in present:
        _, n_sel = run.series("cov/num_selected")
        out["tokens_touched"] = float(n_sel.sum())
        out["tokens_touched_per_step"] = float(n_sel.mean())
        out["steps_with_selection"] = int(np.count_nonzero(n_sel > 0))
    if "cov/mean" in present and "cov/selected_mean" in present:
        out["selected_over_all"] = _ratio_of_means(run, "cov/selected_mean", "cov/mean")
    return out


def _mean_or_none(v: np.ndarray) -> float | None:
    return float(v.mean()) if v.size else None


def _ratio_of_means(run: RunMetrics, num_key: str, den_key: str) -> float | None:
    """Ratio of the means over the steps where both are logged (None if the denominator is ~0)."""
    _, num, den = run.paired(num_key, den_key)
    if num.size == 0:
        return None
    d = float(den.mean())
    return float(num.mean()) / d if abs(d) > 1e-30 and math.isfinite(d) else None
