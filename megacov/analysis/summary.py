"""Everything ``megacov analyze`` computes for one run, as plain data (no plotting here).

Pairing entropy with the validation metric: eval metrics exist only on eval steps, entropy on every
training step. A metric at step s is paired with the entropy logged at s; an eval logged where no
training step logged entropy (typically the initial eval at step 0) is paired with the next logged
entropy, since that policy is the one that sampled the following step's rollouts. A step whose
entropy was logged as NaN/inf is dropped instead: that is a failed measurement, not a gap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from megacov.analysis.dynamics import cov_summary, series_summary
from megacov.analysis.fit import (
    MIN_RELIABLE_POINTS,
    EntropyLawFit,
    FitError,
    Prediction,
    fit_and_predict,
    fit_entropy_law,
    metric_bounds,
)
from megacov.analysis.runs import RunMetrics

DEFAULT_ENTROPY_KEY = "actor/entropy"
DEFAULT_METRIC_KEY = "val/acc"
FALLBACK_METRIC_KEY = "reward/acc"
DEFAULT_REWARD_KEY = "reward/mean"


@dataclass
class AnalysisOptions:
    entropy_key: str = DEFAULT_ENTROPY_KEY
    metric_key: str | None = None
    """None: ``val/acc``, or ``reward/acc`` when a run has fewer than 3 ``val/acc`` points."""
    reward_key: str = DEFAULT_REWARD_KEY
    fit_until: int | float = 0.25
    early_frac: float = 0.1
    n_phases: int = 4
    loss: str = "soft_l1"


@dataclass
class RunAnalysis:
    run: RunMetrics
    entropy_key: str
    metric_key: str
    steps: np.ndarray
    entropy: np.ndarray
    metric: np.ndarray
    fit: EntropyLawFit | None = None
    fit_error: str | None = None
    prediction: Prediction | None = None
    prediction_error: str | None = None
    dynamics: dict = field(default_factory=dict)
    cov: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def analysable(self) -> bool:
        """Anything at all to report: a fit, or at least an entropy or metric curve."""
        return self.fit is not None or any(v is not None for v in self.dynamics.values())

    def as_dict(self) -> dict:
        fit = None
        if self.fit is not None:
            fit = self.fit.as_dict()
            fit["residuals"] = [
                {"step": float(s), "entropy": float(h), "metric": float(r), "fitted": float(f),
                 "residual": float(r - f)}
                for s, h, r, f in zip(self.steps, self.entropy, self.metric, self.fit.predict(self.entropy))]
        return {
            "name": self.run.name, "source": self.run.source, "rows": self.run.n_rows,
            "entropy_key": self.entropy_key, "metric_key": self.metric_key, "pairs": int(self.steps.size),
            "fit": fit, "fit_error": self.fit_error,
            "prediction": self.prediction.as_dict() if self.prediction is not None else None,
            "prediction_error": self.prediction_error,
            "dynamics": self.dynamics, "cov": self.cov,
            "notes": list(self.notes), "warnings": list(self.run.warnings),
        }


def choose_metric_key(run: RunMetrics, requested: str | None) -> tuple[str, str | None]:
    """The metric column to fit, and a note when the default had to fall back."""
    if requested:
        return requested, None
    n_val = run.count(DEFAULT_METRIC_KEY)
    if n_val >= 3 or run.count(FALLBACK_METRIC_KEY) == 0:
        return DEFAULT_METRIC_KEY, None
    return FALLBACK_METRIC_KEY, (f"only {n_val} '{DEFAULT_METRIC_KEY}' point(s); fitted on the training "
                                 f"accuracy '{FALLBACK_METRIC_KEY}' instead")


def pair_metric_with_entropy(run: RunMetrics, entropy_key: str, metric_key: str
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(steps, entropy, metric, n_shifted)``; see the module docstring for the pairing rule."""
    h_steps, h_vals = run.series(entropy_key)
    m_steps, m_vals = run.series(metric_key)
    steps, hs, ms = [], [], []
    shifted = 0
    exact = dict(zip(h_steps.tolist(), h_vals.tolist()))
    logged = run.columns.get(entropy_key, {})
    for s, m in zip(m_steps.tolist(), m_vals.tolist()):
        if s in exact:
            h = exact[s]
        elif s in logged:
            continue  # entropy logged but not finite at this step: a bad measurement, not a gap
        else:
            later = np.searchsorted(h_steps, s, side="right")
            if later >= h_steps.size:
                continue
            h = float(h_vals[later])
            shifted += 1
        steps.append(s)
        hs.append(h)
        ms.append(m)
    return np.array(steps), np.array(hs), np.array(ms), shifted


def analyze_run(run: RunMetrics, options: AnalysisOptions) -> RunAnalysis:
    """Fit, predict and summarise one run; problems become notes and partial results, not errors."""
    metric_key, note = choose_metric_key(run, options.metric_key)
    steps, h, m, shifted = pair_metric_with_entropy(run, options.entropy_key, metric_key)
    res = RunAnalysis(run=run, entropy_key=options.entropy_key, metric_key=metric_key,
                      steps=steps, entropy=h, metric=m)
    if note:
        res.notes.append(note)
    for key in (options.entropy_key, metric_key):
        if run.count(key) == 0 and key not in run.columns:
            res.notes.append(f"no '{key}' column (columns: {_key_list(run)})")
        elif run.non_finite(key):
            res.notes.append(f"{run.non_finite(key)} non-finite '{key}' value(s) ignored")
    if shifted:
        res.notes.append(f"{shifted} '{metric_key}' point(s) without entropy at the same step were "
                         "paired with the next logged entropy")
    try:
        res.fit = fit_entropy_law(h, m, loss=options.loss)
    except FitError as exc:
        res.fit_error = str(exc)
    if res.fit is not None:
        try:
            res.prediction = fit_and_predict(steps, h, m, options.fit_until, loss=options.loss,
                                             bounds=metric_bounds(m))
        except FitError as exc:
            res.prediction_error = str(exc)
        if res.prediction is not None and res.prediction.fit.n < MIN_RELIABLE_POINTS:
            res.notes.append(f"the prediction is fitted on only {res.prediction.fit.n} point(s) (steps <= "
                             f"{res.prediction.cutoff_step:g}); fewer than {MIN_RELIABLE_POINTS} make it "
                             "unreliable: evaluate more often or fit on more steps (--fit-until)")
        if res.fit.a <= 0:
            res.notes.append(f"fitted a = {res.fit.a:.3g} <= 0: '{metric_key}' does not rise as entropy "
                             "falls, so the ceiling -a + b is not an upper bound here")
    res.dynamics = {
        "entropy": series_summary(*run.series(options.entropy_key), early_frac=options.early_frac,
                                  n_phases=options.n_phases),
        "metric": series_summary(*run.series(metric_key), early_frac=options.early_frac,
                                 n_phases=options.n_phases),
        "reward": series_summary(*run.series(options.reward_key), early_frac=options.early_frac,
                                 n_phases=options.n_phases),
    }
    res.cov = cov_summary(run, options.n_phases)
    return res


def _key_list(run: RunMetrics, limit: int = 12) -> str:
    keys = run.keys
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "") if keys else "none"


def to_jsonable(obj):
    """NaN/inf become None so ``--json`` output is strict JSON; numpy scalars become Python ones."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
