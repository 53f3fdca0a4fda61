"""Synthetic runs drawn from a known entropy law, for tests and for showing the report without a GPU.

Every generated run says what it is: ``synthetic.json`` beside its ``metrics.jsonl`` records the
true (a, b) and the generator settings, so nobody mistakes a demo for a measurement. The rows use
the trainer's metric names (eval metrics only on eval steps, in the same row), so the files exercise
exactly the path a real run takes.

Shapes: entropy decays exponentially from ``h0`` towards ``h_final`` with time constant ``tau``
steps; validation accuracy is -a * exp(H) + b plus Gaussian noise; training reward tracks it with
more noise. Covariance statistics follow the entropy (high-covariance tokens are what drives
entropy down), and runs with a controller log the number of tokens it selected.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class SyntheticSpec:
    a: float = 0.04
    b: float = 0.72
    h0: float = 1.6
    h_final: float = 0.05
    tau: float = 25.0
    steps: int = 200
    eval_every: int = 5
    val_noise: float = 0.005
    reward_noise: float = 0.02
    entropy_noise: float = 0.01
    tokens_per_step: int = 40000
    select_ratio: float = 0.0
    """Share of tokens a covariance controller touches each step (0: no controller)."""
    seed: int = 0


# The three demo runs: no control, and the two controllers keeping entropy up (their b is higher
# because, in the paper, escaping entropy collapse is what lifts the ceiling).
DEMO_SPECS = {
    "ppo": SyntheticSpec(a=0.04, b=0.72, h_final=0.05, seed=1),
    "clip_cov": SyntheticSpec(a=0.05, b=0.80, h_final=0.45, tau=40.0, select_ratio=2e-4, seed=2),
    "kl_cov": SyntheticSpec(a=0.05, b=0.81, h_final=0.55, tau=45.0, select_ratio=2e-3, seed=3),
}


def entropy_curve(spec: SyntheticSpec, steps: np.ndarray) -> np.ndarray:
    return spec.h_final + (spec.h0 - spec.h_final) * np.exp(-(steps - 1) / spec.tau)


def synthetic_rows(spec: SyntheticSpec) -> list[dict]:
    """One dict per step 1..spec.steps with the trainer's metric names."""
    rng = np.random.default_rng(spec.seed)
    steps = np.arange(1, spec.steps + 1, dtype=np.float64)
    h_true = entropy_curve(spec, steps)
    h_obs = np.maximum(h_true + rng.normal(0.0, spec.entropy_noise, steps.size), 1e-4)
    law = -spec.a * np.exp(h_true) + spec.b
    rows = []
    for i, step in enumerate(steps.astype(int)):
        reward_acc = float(np.clip(law[i] + rng.normal(0.0, spec.reward_noise), 0.0, 1.0))
        cov_mean = 0.02 * h_true[i] + rng.normal(0.0, 0.001)
        n_sel = int(max(1, spec.select_ratio * spec.tokens_per_step)) if spec.select_ratio > 0 else 0
        row = {
            "step": int(step), "actor/entropy": float(h_obs[i]),
            "reward/mean": reward_acc, "reward/acc": reward_acc,
            "cov/mean": float(cov_mean), "cov/std": float(0.5 * h_true[i] + 0.05),
            "cov/max": float(8.0 * h_true[i] + 1.0), "cov/num_selected": n_sel,
            "response/len_mean": float(300 + 200 * (1 - h_true[i] / spec.h0)),
            "time/step": float(10.0 + rng.normal(0.0, 0.3)),
        }
        if n_sel:
            row["cov/selected_mean"] = float(4.0 * h_true[i] + 1.0 + rng.normal(0.0, 0.05))
        if step % spec.eval_every == 0:
            row["val/acc"] = float(law[i] + rng.normal(0.0, spec.val_noise))
        rows.append(row)
    return rows


def write_synthetic_run(run_dir: str, spec: SyntheticSpec | None = None, *,
                        truncate_last: bool = False) -> str:
    """Write ``metrics.jsonl`` (and ``synthetic.json``) into ``run_dir``; returns the metrics path.

    ``truncate_last`` cuts the final line in half, as a run killed mid-write leaves it.
    """
    spec = spec or SyntheticSpec()
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "metrics.jsonl")
    lines = [json.dumps(row) for row in synthetic_rows(spec)]
    text = "\n".join(lines) + "\n"
    if truncate_last:
        text = "\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    with open(os.path.join(run_dir, "synthetic.json"), "w", encoding="utf-8") as fh:
        json.dump({"synthetic": True, "law": "val/acc = -a*exp(H) + b + noise",
                   "ceiling": -spec.a + spec.b, **asdict(spec)}, fh, indent=1)
    return path


def write_demo_runs(out_dir: str) -> list[str]:
    """The three demo runs (ppo, clip_cov, kl_cov) under ``out_dir``; returns their directories."""
    dirs = []
    for name, spec in DEMO_SPECS.items():
        run_dir = os.path.join(out_dir, name)
        write_synthetic_run(run_dir, spec)
        dirs.append(run_dir)
    return dirs

