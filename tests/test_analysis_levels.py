"""What ``megacov analyze`` reports about a change: smoothed levels, significance against the noise,
bounded predictions, and warnings about thin fits."""
from __future__ import annotations

import json

import numpy as np
import pytest

from megacov.analysis.dynamics import early_share, levels, noise_sd, phase_changes
from megacov.analysis.fit import fit_and_predict, metric_bounds
from megacov.analysis.report import COMPARISON_ROWS, NO_CHANGE
from megacov.analysis.runs import read_run
from megacov.analysis.summary import AnalysisOptions, analyze_run


def test_levels_are_window_means_and_noise_is_not_a_change():
    rng = np.random.default_rng(0)
    flat = 1.0 + rng.normal(0, 0.05, 100)                       # pure noise around 1.0
    lv = levels(flat)
    assert lv["start"] == pytest.approx(flat[:10].mean()) and lv["end"] == pytest.approx(flat[-10:].mean())
    assert lv["points"] == 10 and not lv["significant"]
    assert noise_sd(flat) == pytest.approx(0.05, rel=0.3)
    steps = np.arange(1, 101)
    assert early_share(steps, flat)["share"] is None
    assert all(p["share"] is None for p in phase_changes(steps, flat))
    drop = 1.0 - 0.5 * (1 - np.exp(-steps / 10)) + rng.normal(0, 0.05, 100)   # a real 50% drop
    lv = levels(drop)
    assert lv["significant"] and lv["ratio"] == pytest.approx(drop[-10:].mean() / drop[:10].mean())
    assert early_share(steps, drop)["share"] is not None


def _run(tmp_path, name, entropy, val, eval_steps):
    path = tmp_path / name
    path.mkdir()
    with open(path / "metrics.jsonl", "w") as fh:
        for s, h in enumerate(entropy, start=1):
            row = {"step": s, "actor/entropy": float(h), "reward/mean": 0.5, "reward/acc": 0.5}
            if s in eval_steps:
                row["val/acc"] = float(val[eval_steps.index(s)])
            fh.write(json.dumps(row) + "\n")
    return read_run(str(path))


def test_noisy_run_says_no_significant_change_and_thin_fits_warn(tmp_path):
    rng = np.random.default_rng(1)
    ent = 1.0 + rng.normal(0, 0.05, 40)
    eval_steps = [1, 5, 10, 20, 30, 40]
    run = _run(tmp_path, "noisy", ent, [0.2, 0.23, 0.25, 0.22, 0.24, 0.21], eval_steps)
    res = analyze_run(run, AnalysisOptions())
    row = dict(COMPARISON_ROWS)
    assert row["share of entropy change in early steps"](res) == NO_CHANGE
    assert "(not significant)" in row["entropy start → end (first / last 10% of steps)"](res)
    assert any("fitted on only 3 point(s)" in n for n in res.notes)   # the first quarter has 3 evals


def test_predictions_stay_in_the_metric_range():
    # A steep early fit extrapolates below 0 at high entropy; the prediction is clipped to [0, 1].
    steps = np.arange(1, 21, dtype=float)
    h = np.concatenate([np.linspace(0.1, 0.3, 5), np.linspace(2.5, 3.0, 15)])
    m = np.concatenate([np.linspace(0.9, 0.7, 5), np.full(15, 0.1)])
    assert metric_bounds(m) == (0.0, 1.0) and metric_bounds(m * 100) is None
    free = fit_and_predict(steps, h, m, 0.25)
    bounded = fit_and_predict(steps, h, m, 0.25, bounds=metric_bounds(m))
    assert free.predicted.min() < 0.0
    assert bounded.predicted.min() >= 0.0 and bounded.predicted.max() <= 1.0
