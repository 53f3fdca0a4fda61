"""Reading metrics files (trainer JSONL, exports as CSV) and the per-run dynamics computed from them."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from megacov.analysis.dynamics import cov_summary, early_share, phase_changes, smooth
from megacov.analysis.runs import RunReadError, read_run
from megacov.analysis.summary import AnalysisOptions, analyze_run, pair_metric_with_entropy
from megacov.analysis.synthetic import SyntheticSpec, synthetic_rows, write_synthetic_run


def _write_lines(path, lines):
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


def test_truncated_last_line_is_skipped_with_file_and_line(tmp_path):
    path = write_synthetic_run(str(tmp_path / "run"), SyntheticSpec(steps=30), truncate_last=True)
    run = read_run(str(tmp_path / "run"))
    assert run.n_rows == 29
    assert run.steps[-1] == 29
    assert any(w == f"{path}:30: skipped truncated last line" for w in run.warnings), run.warnings
    assert run.name == "run"


def test_rows_merge_by_step_and_later_values_win(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_lines(path, [
        json.dumps({"step": 1, "actor/entropy": 1.0}),
        json.dumps({"step": 1, "val/acc": 0.3}),          # eval row for the same step
        json.dumps({"step": 2, "actor/entropy": 0.9}),
        "[1, 2]",                                        # not an object
        '{"step": 3, "actor/entropy": oops}',            # unreadable middle line
        json.dumps({"step": 2, "actor/entropy": 0.8}),   # resumed run repeats step 2
        json.dumps({"step": 4, "actor/entropy": "n/a", "note": {"x": 1}}),
        json.dumps({"step": 5, "actor/entropy": float("nan"), "val/acc": 0.5}),
        "",
    ])
    run = read_run(str(path))
    assert run.columns["actor/entropy"][1.0] == 1.0 and run.columns["val/acc"][1.0] == 0.3
    assert run.columns["actor/entropy"][2.0] == 0.8
    steps, _ = run.series("actor/entropy")
    np.testing.assert_array_equal(steps, [1, 2])
    assert run.non_finite("actor/entropy") == 1
    text = "\n".join(run.warnings)
    assert f"{path}:4: skipped a row that is not a JSON object" in text
    assert f"{path}:5: skipped unreadable line" in text
    assert "1 non-numeric value(s) of 'actor/entropy'" in text
    assert "logged again for an earlier step" in text
    assert "note" not in run.columns


def test_csv_export_with_other_column_names(tmp_path):
    rows = synthetic_rows(SyntheticSpec(steps=40, seed=5))
    path = tmp_path / "wandb_export.csv"
    lines = ["_step,train/entropy,eval/score"]
    for row in rows:
        lines.append(f"{row['step']},{row['actor/entropy']},{row.get('val/acc', '')}")
    lines.append("41,0.3")  # truncated last row
    _write_lines(path, lines)
    run = read_run(str(path))
    assert run.name == "wandb_export"
    assert run.count("train/entropy") == 40 and run.count("eval/score") == 8
    assert any(w.startswith(f"{path}:42: skipped truncated last line") for w in run.warnings)
    res = analyze_run(run, AnalysisOptions(entropy_key="train/entropy", metric_key="eval/score"))
    assert res.fit is not None and res.steps.size == 8


def test_missing_paths_and_empty_files_name_the_path(tmp_path):
    with pytest.raises(RunReadError, match="no such file"):
        read_run(str(tmp_path / "nope"))
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(RunReadError, match="no metrics.jsonl or metrics.csv"):
        read_run(str(tmp_path / "empty_run"))
    _write_lines(tmp_path / "empty_run" / "metrics.jsonl", ['{"step": 1, "x'])
    with pytest.raises(RunReadError, match="no readable metric rows"):
        read_run(str(tmp_path / "empty_run"))


def test_rows_without_step_column_keep_their_order(tmp_path):
    path = tmp_path / "m.jsonl"
    _write_lines(path, [json.dumps({"entropy": 1.0 - 0.1 * i}) for i in range(5)])
    run = read_run(str(path))
    np.testing.assert_array_equal(run.series("entropy")[0], [0, 1, 2, 3, 4])
    assert any("no step column" in w for w in run.warnings)


def test_eval_without_entropy_pairs_with_next_step():
    from megacov.analysis.runs import RunMetrics

    run = RunMetrics(name="r", source="-", columns={
        "actor/entropy": {1.0: 1.0, 2.0: 0.9, 3.0: 0.8},
        "val/acc": {0.0: 0.1, 2.0: 0.2, 5.0: 0.9},  # 0: initial eval; 5: no later entropy
    })
    steps, h, _, shifted = pair_metric_with_entropy(run, "actor/entropy", "val/acc")
    np.testing.assert_array_equal(steps, [0, 2])
    np.testing.assert_array_equal(h, [1.0, 0.9])
    assert shifted == 1


def test_smooth_is_a_centred_moving_average():
    v = np.array([0.0, 3.0, 6.0, 3.0, 0.0, 9.0])
    np.testing.assert_allclose(smooth(v, 3), [1.5, 3.0, 4.0, 3.0, 4.0, 4.5])
    np.testing.assert_array_equal(smooth(v, 1), v)


def test_phase_changes_and_early_share_match_direct_computation():
    steps = np.arange(1, 101, dtype=np.float64)
    values = 2.0 * np.exp(-steps / 10.0)  # smooth already: window 5 barely moves it
    phases = phase_changes(steps, values, 4)
    assert len(phases) == 4
    assert sum(p["change"] for p in phases) == pytest.approx(phases[-1]["end"] - phases[0]["start"])
    assert sum(p["share"] for p in phases) == pytest.approx(1.0)
    sm = smooth(values)
    bounds = np.linspace(1, 100, 5)
    direct = np.diff(np.interp(bounds, steps, sm))
    np.testing.assert_allclose([p["change"] for p in phases], direct)
    assert phases[0]["share"] > 0.9  # an exponential with tau = 10 steps drops mostly in the first quarter
    early = early_share(steps, values, 0.1)
    cut_level = np.interp(1 + 0.1 * 99, steps, sm)
    assert early["until_step"] == pytest.approx(10.9)
    assert early["share"] == pytest.approx((cut_level - sm[0]) / (sm[-1] - sm[0]))
    assert early_share(steps, np.full(100, 0.3), 0.1)["share"] is None
    assert phase_changes(steps[:1], values[:1]) == [] and early_share(steps[:1], values[:1]) is None


def test_cov_summary_counts_touched_tokens(tmp_path):
    spec = SyntheticSpec(steps=50, select_ratio=1e-3, tokens_per_step=8000)
    write_synthetic_run(str(tmp_path / "kl"), spec)
    run = read_run(str(tmp_path / "kl"))
    cov = cov_summary(run)
    _, n_sel = run.series("cov/num_selected")
    assert cov["tokens_touched"] == pytest.approx(n_sel.sum()) == 8 * 50
    assert cov["steps_with_selection"] == 50
    _, sel, allv = run.paired("cov/selected_mean", "cov/mean")
    assert cov["selected_over_all"] == pytest.approx(sel.mean() / allv.mean())
    assert cov["selected_over_all"] > 10
    assert len(cov["mean_by_phase"]) == 4
    write_synthetic_run(str(tmp_path / "ppo"), SyntheticSpec(steps=50))
    ppo = cov_summary(read_run(str(tmp_path / "ppo")))
    assert ppo["tokens_touched"] == 0 and "selected_over_all" not in ppo


def test_analyze_run_falls_back_to_training_accuracy_and_says_so(tmp_path):
    write_synthetic_run(str(tmp_path / "r"), SyntheticSpec(steps=12, eval_every=5))  # 2 val points
    res = analyze_run(read_run(str(tmp_path / "r")), AnalysisOptions())
    assert res.metric_key == "reward/acc"
    assert any("only 2 'val/acc' point(s)" in n for n in res.notes)
    assert res.fit is not None and res.fit.n == 12
    explicit = analyze_run(read_run(str(tmp_path / "r")), AnalysisOptions(metric_key="val/acc"))
    assert explicit.fit is None and "at least 3" in explicit.fit_error
    assert explicit.analysable  # entropy dynamics still reported


def test_analyze_run_with_nan_rows_and_missing_column(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = synthetic_rows(SyntheticSpec(steps=60, seed=2))
    rows[9]["val/acc"] = float("nan")    # step 10 eval
    rows[19]["actor/entropy"] = float("inf")
    _write_lines(path, [json.dumps(r) for r in rows])
    res = analyze_run(read_run(str(tmp_path)), AnalysisOptions())
    assert res.fit is not None and res.fit.n == 12 - 1 - 1
    assert any("1 non-finite 'val/acc'" in n for n in res.notes)
    assert any("1 non-finite 'actor/entropy'" in n for n in res.notes)
    missing = analyze_run(read_run(str(tmp_path)), AnalysisOptions(entropy_key="policy/entropy"))
    assert missing.fit is None and any("no 'policy/entropy' column" in n for n in missing.notes)
    assert math.isfinite(missing.dynamics["metric"]["last"])
