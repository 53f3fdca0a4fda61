"""The entropy demo's figures and claims, computed from run folders (no training here: the runs are
written directly; the end-to-end quick mode is the slow test at the bottom)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from megacov.analysis import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL_CLAIM = "at least one entropy method clearly higher (> 2 SE) on full credit (training or held-out)"


def _write_run(path, *, h_end: float, full_end: float, val_end: float, seed: int, steps: int = 60) -> None:
    rng = np.random.default_rng(seed)
    os.makedirs(path)
    s = np.arange(1, steps + 1)
    h = h_end + (1.0 - h_end) * np.exp(-s / 10) + rng.normal(0, 0.01, steps)
    full = full_end * (1 - np.exp(-s / 15))
    with open(os.path.join(path, "metrics.jsonl"), "w") as fh:
        fh.write(json.dumps({"step": 0, "val/score": 0.01}) + "\n")
        for i, step in enumerate(s):
            row = {"step": int(step), "actor/entropy": float(h[i]), "reward/full": float(full[i]),
                   "reward/mean": float(0.4 + 0.5 * full[i]), "div/rewarded_rate": 0.8,
                   "div/distinct_rewarded": float(1 + 6 * h[i]), "div/distinct": float(1 + 7 * h[i])}
            if step % 10 == 0:
                row["val/score"] = float(0.01 + (val_end - 0.01) * (1 - np.exp(-step / 15)))
                row["val/acc"] = float(full[i] * 0.8)
                row["val/eval/pass@16"] = float(h[i])   # narrows as the entropy falls
            fh.write(json.dumps(row) + "\n")


def test_figures_and_claims_from_runs(tmp_path):
    runs = []
    for method, h_end, full_end, val_end in (("grpo", 0.1, 0.2, 0.2), ("clip_cov", 0.6, 0.6, 0.55)):
        for seed in (0, 1):
            name = f"{method}-s{seed}"
            _write_run(str(tmp_path / name), h_end=h_end, full_end=full_end + 0.02 * seed, val_end=val_end,
                       seed=seed)
            runs.append((method, seed, name))
    cfg = types.SimpleNamespace(data=types.SimpleNamespace(batch_size=16, eval_files=[str(tmp_path / "eval.jsonl")]),
                                rollout=types.SimpleNamespace(n=8), trainer=types.SimpleNamespace(eval_n=16,
                                                                                                  total_steps=60))
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps({"prompt": "a6=", "answer": "6|30"}) for _ in range(12)))
    from megacov.cli.demo import write_demo_report

    path = write_demo_report(cfg, str(tmp_path), runs, command="megacov demo entropy", elapsed=1.0)
    with open(path) as fh:
        text = fh.read()
    with open(tmp_path / "figures.json") as fh:
        fig = json.load(fh)
    by = {r["name"]: r for r in fig["runs"]}
    assert by["grpo-s0"]["entropy_ratio"] < 0.2 < by["clip_cov-s0"]["entropy_ratio"]
    assert by["grpo-s0"]["val_pass_end"] < by["clip_cov-s0"]["val_pass_end"]
    claims = {c["claim"]: c for c in fig["claims"]}
    assert claims["grpo end entropy < 20% of its start"]["met"] is True
    assert claims["clip_cov end entropy ≥ 3× grpo's"]["met"] is True
    assert claims[FULL_CLAIM]["met"] is True
    assert claims["clip_cov final val full-credit rate ≥ grpo's"]["met"] is True
    assert by["grpo-s1"]["val_full_end"] < by["clip_cov-s1"]["val_full_end"]
    assert "| entropy end / start |" in text and "± " in text and "end entropy ÷ grpo's" in text
    assert os.path.isfile(tmp_path / "curves.png") and os.path.isfile(tmp_path / "analysis" / "report.html")


def test_claims_fail_when_the_baseline_does_not_collapse():
    def figures(method, h0, h1, full):
        f = demo.RunFigures(method, method, 0)
        f.values.update(entropy_start=h0, entropy_end=h1, entropy_ratio=h1 / h0, full_rate_end=full,
                        reward_end=full, val_start=0.1, val_end=0.1)
        f.counts.update(full_rate_end=1000, val_start=100, val_end=100)
        return f

    methods = demo.group_by_method([figures("grpo", 1.0, 0.8, 0.3), figures("kl_cov", 1.0, 0.9, 0.3)],
                                   ["grpo", "kl_cov"])
    claims = {b.claim: b.met for b in demo.check_bars(methods)}
    assert claims["grpo end entropy < 20% of its start"] is False
    assert claims["kl_cov end entropy ≥ 3× grpo's"] is False
    assert claims[FULL_CLAIM] is False
    assert claims["grpo val score rises > 2 SE from step 0"] is False


def test_full_credit_claim_counts_the_held_out_rate_with_its_seed_spread():
    """Training full credit within the seeds' spread; the held-out rate decides, and its own spread counts."""
    def figures(method, seed, full, val_full):
        f = demo.RunFigures(f"{method}-s{seed}", method, seed)
        f.values.update(full_rate_end=full, val_full_end=val_full)
        f.counts.update(full_rate_end=1000, val_full_end=500)
        return f

    def claim(grpo_val_full):
        runs = [figures("grpo", 0, 0.2, grpo_val_full[0]), figures("grpo", 1, 0.6, grpo_val_full[1]),
                figures("clip_cov", 0, 0.7, 0.45), figures("clip_cov", 1, 0.75, 0.5)]
        bars = demo.check_bars(demo.group_by_method(runs, ["grpo", "clip_cov"]))
        return next(b for b in bars if b.claim == FULL_CLAIM)

    met = claim((0.10, 0.20))
    assert met.met is True and "training +0.325" in met.measured and "held-out +0.325" in met.measured
    assert claim((0.05, 0.45)).met is False     # same mean gap on held-out, but the seeds disagree


@pytest.mark.slow
def test_quick_demo_keeps_more_entropy_with_clip_cov(tmp_path):
    """``megacov demo entropy --quick``: GRPO vs Clip-Cov from one warm-start; Clip-Cov ends with more
    entropy (the direction of the paper's effect; the size is in the demo's report)."""
    out = tmp_path / "quick"
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-m", "megacov", "demo", "entropy", "--quick", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "figures.json") as fh:
        fig = {r["method"]: r for r in json.load(fh)["runs"]}
    assert fig["clip_cov"]["entropy_end"] > fig["grpo"]["entropy_end"], fig
    assert (out / "report.md").is_file() and (out / "curves.png").is_file()


def test_bad_demo_arguments_exit_2_with_one_line(tmp_path, capsys):
    from megacov.cli import main

    assert main(["demo", "entropy", "--methods", "grpo,foo", "--out", str(tmp_path)]) == 2
    assert "unknown method(s) foo" in capsys.readouterr().err
    assert main(["demo", "entropy", "--seeds", "a", "--out", str(tmp_path)]) == 2
    assert main(["demo", "entropy", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path)]) == 2
    cfg = os.path.join(REPO, "examples", "entropy", "config.yaml")
    assert main(["demo", "entropy", f"model.path={tmp_path / 'model'}",
                 f"data.train_files=[{tmp_path / 'd' / 'train.jsonl'}]", f"data.eval_files=[{tmp_path / 'd' / 'eval.jsonl'}]",
                 f"data.sft_files=[{tmp_path / 'd' / 'sft.jsonl'}]",
                 "--config", cfg, "--report-only", "--out", str(tmp_path / "empty")]) == 2
    assert "no finished runs" in capsys.readouterr().err.strip().splitlines()[-1]
