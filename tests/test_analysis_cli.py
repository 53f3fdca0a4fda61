"""``megacov analyze`` end to end on synthetic run directories: results, files, partial input, exit codes."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megacov.analysis.synthetic import DEMO_SPECS, SyntheticSpec, synthetic_rows, write_synthetic_run
from megacov.cli import main


def _run(capsys, *argv):
    code = main(["analyze", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_demo_runs_fit_predict_and_report(tmp_path, capsys):
    code, out, err = _run(capsys, "--demo", str(tmp_path), "--json")
    assert code == 0, err
    result = json.loads(out)
    runs = {r["name"]: r for r in result["runs"]}
    assert set(runs) == set(DEMO_SPECS)
    for name, spec in DEMO_SPECS.items():
        r = runs[name]
        assert r["metric_key"] == "val/acc" and r["pairs"] == spec.steps // spec.eval_every
        assert abs(r["fit"]["ceiling"] - (spec.b - spec.a)) < 0.02, (name, r["fit"])
        assert r["fit"]["r2"] > 0.9
        # Prediction numbers agree with the rows in the file (final step = last eval step).
        with open(os.path.join(tmp_path, name, "metrics.jsonl")) as fh:
            rows = [json.loads(line) for line in fh]
        last_eval = [row for row in rows if "val/acc" in row][-1]
        p = r["prediction"]
        assert p["final_step"] == last_eval["step"] and p["final_actual"] == last_eval["val/acc"]
        expected = -p["a"] * np.exp(last_eval["actor/entropy"]) + p["b"]
        assert p["final_predicted"] == pytest.approx(expected, rel=1e-12)
        assert p["final_error"] == pytest.approx(expected - last_eval["val/acc"], rel=1e-9)
        assert len(r["fit"]["residuals"]) == r["pairs"]
    assert runs["ppo"]["cov"]["tokens_touched"] == 0
    assert runs["kl_cov"]["cov"]["tokens_touched"] > runs["clip_cov"]["cov"]["tokens_touched"] > 0
    # Entropy collapses fastest without control.
    assert runs["ppo"]["dynamics"]["entropy"]["last"] < runs["clip_cov"]["dynamics"]["entropy"]["last"]
    out_dir = tmp_path / "analysis"
    assert result["report"] == str(out_dir / "report.html")
    for name in ("entropy_vs_step", "metric_vs_step", "metric_vs_entropy", "cov_stats"):
        assert (out_dir / f"{name}.png").stat().st_size > 5000
    page = (out_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    assert '<table class="comparison">' in page and "kl_cov" in page
    assert "src=\"file:" not in page and "<script" not in page  # self-contained, no external fetches


def test_text_summary_and_default_out_dir(tmp_path, capsys):
    write_synthetic_run(str(tmp_path / "ppo"), SyntheticSpec(steps=60))
    code, out, err = _run(capsys, str(tmp_path / "ppo"))
    assert code == 0, err
    assert "ceiling -a + b" in out and "ppo" in out
    assert f"report: {tmp_path / 'analysis' / 'report.html'}" in out
    assert (tmp_path / "analysis" / "report.html").exists()
    assert not (tmp_path / "ppo" / "analysis").exists()  # the run folder holds only what training wrote


def test_partial_input_is_reported_and_the_rest_analysed(tmp_path, capsys):
    good = tmp_path / "good"
    write_synthetic_run(str(good), SyntheticSpec(steps=40), truncate_last=True)
    few = tmp_path / "few"
    write_synthetic_run(str(few), SyntheticSpec(steps=4, eval_every=100))  # 4 points, no val/acc
    (tmp_path / "blank").mkdir()
    code, out, err = _run(capsys, str(good), str(tmp_path / "missing"), str(tmp_path / "blank"),
                          str(few), "--json", "--no-report")
    assert code == 0, err
    result = json.loads(out)
    assert [r["name"] for r in result["runs"]] == ["good", "few"]
    assert f"{good / 'metrics.jsonl'}:40: skipped truncated last line" in err
    assert f"{tmp_path / 'missing'}: no such file or run directory" in err
    assert "no metrics.jsonl or metrics.csv" in err
    assert "fitted on the training accuracy 'reward/acc' instead" in err
    assert result["report"] is None and not (good / "analysis").exists()


def test_nothing_to_analyse_exits_2_with_one_line(tmp_path, capsys):
    code, out, err = _run(capsys, str(tmp_path / "missing"))
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1].startswith("megacov: error: nothing could be analysed")
    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"step": 1, "other": 2}\n')
    code, _, err = _run(capsys, str(junk))
    assert code == 2 and "nothing to analyse" in err
    code, _, err = _run(capsys)
    assert code == 2 and "give at least one run" in err


def test_csv_export_with_chosen_columns(tmp_path, capsys):
    rows = synthetic_rows(SyntheticSpec(steps=80, seed=4))
    lines = ["global_step,policy_entropy,test_score"]
    lines += [f"{r['step']},{r['actor/entropy']},{r.get('val/acc', '')}" for r in rows]
    (tmp_path / "export.csv").write_text("\n".join(lines) + "\n")
    code, out, err = _run(capsys, str(tmp_path / "export.csv"), "--entropy-key", "policy_entropy",
                          "--metric-key", "test_score", "--fit-until", "40", "--json",
                          "--out", str(tmp_path / "rep"))
    assert code == 0, err
    r = json.loads(out)["runs"][0]
    assert r["name"] == "export" and r["pairs"] == 16
    assert r["prediction"]["fit_until_step"] == 40 and r["prediction"]["n_fit"] == 8
    assert (tmp_path / "rep" / "report.html").exists()


@pytest.mark.parametrize("bad", [["--fit-until", "1.5"], ["--fit-until", "abc"], ["--early-frac", "0"],
                                 ["--phases", "0"], ["--loss", "l2"]])
def test_bad_options_exit_2(tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(tmp_path), *bad])
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err
