"""The figures of the entropy demo (``megacov demo entropy``), computed from its runs' metrics.

One row per figure, one column per method, each cell the mean over seeds +- the spread (half the
range between seeds). Levels are means over the first / last 10% of training steps (a single step
is noise); the validation figure is ``val/score``, the mean held-out reward (so partial and full
credit both count), at the step-0 evaluation and as the level of the last 10% of evaluations; the
held-out full-credit rate (``val/acc``, the share of held-out samples that are correct answers) is
levelled the same way. "Clearly higher on full credit" is checked on the training prompts and on
the held-out ones: with two seeds the baseline's training rate depends on which bonuses each seed
happened to find, and the held-out rate shows whether what was found carries over.
"Beyond 2 standard errors" uses the binomial standard error of the rates (samples counted from the
run; for a score in [0, 1] an upper bound), pooled over seeds together with the seed-to-seed
variance, so a difference must beat both sampling noise and seeds.

The bars checked are the paper's qualitative claims at this scale: the baseline's entropy collapses,
Clip-Cov / KL-Cov keep several times more of it, and keeping it pays on the full-credit behaviour.
Pure numpy (and matplotlib for the curves only); nothing here runs training.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from megacov.analysis.dynamics import levels, smooth
from megacov.analysis.fit import FitError, fit_and_predict, fit_entropy_law, metric_bounds
from megacov.analysis.runs import RunMetrics

BASELINE = "grpo"
#: Bars of the demo: the baseline's end/start entropy must fall below this ...
COLLAPSE_BAR = 0.20
#: ... and the entropy-control methods must keep at least this multiple of its end entropy.
KEEP_BAR = 3.0
FIT_R2_BAR = 0.9
PREDICTION_BAR = 0.05
#: The validation figure: the mean held-out score (partial credit for a valid answer, full credit for
#: the rarer full answer), so both what sharpening learns and what exploration finds count in it.
VAL_KEY = "val/score"
#: The held-out full-credit rate (the share of held-out samples that are correct answers).
VAL_FULL_KEY = "val/acc"


@dataclass
class RunFigures:
    name: str
    method: str
    seed: int
    values: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    """Samples behind each rate (for its binomial standard error)."""


def _levels(run: RunMetrics, key: str) -> dict | None:
    _, v = run.series(key)
    return levels(v) if v.size >= 2 else None


def _eval_levels(run: RunMetrics, key: str) -> tuple[float, float, int] | None:
    """(step-0 evaluation, end level, evaluations in it). Step 0 is one evaluation of the warm-start;
    the end is the level of the last 10% of the evaluations, since a collapsed policy flips whole
    prompts between evaluations."""
    _, v = run.series(key)
    if not v.size:
        return None
    end = levels(v)
    return (float(v[0]), end["end"], end["points"]) if end else (float(v[0]), float(v[-1]), 1)


def run_figures(run: RunMetrics, method: str, seed: int, *, batch_samples: int, eval_samples: int) -> RunFigures:
    """Every figure of one run. ``batch_samples``: responses per training step; ``eval_samples``:
    responses per evaluation (prompts x k)."""
    out = RunFigures(run.name, method, seed)
    v, c = out.values, out.counts
    ent = _levels(run, "actor/entropy")
    if ent:
        v["entropy_start"], v["entropy_end"] = ent["start"], ent["end"]
        v["entropy_ratio"] = ent["end"] / ent["start"] if ent["start"] > 0 else math.nan
    for key, name in (("reward/mean", "reward"), ("reward/full", "full_rate"), ("div/rewarded_rate", "valid_rate"),
                      ("div/distinct_rewarded", "distinct_rewarded"), ("div/distinct", "distinct")):
        lv = _levels(run, key)
        if lv:
            v[f"{name}_start"], v[f"{name}_end"] = lv["start"], lv["end"]
            c[f"{name}_end"] = c[f"{name}_start"] = lv["points"] * batch_samples
    for key, name in ((VAL_KEY, "val"), (VAL_FULL_KEY, "val_full")):
        val = _eval_levels(run, key)
        if val:
            v[f"{name}_start"], v[f"{name}_end"] = val[0], val[1]
            c[f"{name}_start"], c[f"{name}_end"] = eval_samples, val[2] * eval_samples
    pass_key = next((k for k in run.keys if k.startswith("val/") and "/pass@" in k), None)
    passed = _eval_levels(run, pass_key) if pass_key else None
    if passed:  # the share of held-out prompts solved at least once in k samples
        v["val_pass_start"], v["val_pass_end"] = passed[0], passed[1]
    steps, h, m = _law_pairs(run)
    try:
        fit = fit_entropy_law(h, m)
        v["law_r2"], v["law_a"], v["law_b"] = fit.r2, fit.a, fit.b
    except FitError:
        pass
    try:
        pred = fit_and_predict(steps, h, m, 0.25, bounds=metric_bounds(m))
        v["pred_final"], v["pred_actual"] = float(pred.predicted[-1]), float(pred.actual[-1])
        v["pred_rel_error"] = (abs(v["pred_final"] - v["pred_actual"]) / abs(v["pred_actual"])
                               if v["pred_actual"] else math.nan)
        v["pred_points"] = float(pred.fit.n)
    except FitError:
        pass
    return out


def _law_pairs(run: RunMetrics) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from megacov.analysis.summary import pair_metric_with_entropy

    steps, h, m, _ = pair_metric_with_entropy(run, "actor/entropy", VAL_KEY)
    return steps, h, m


@dataclass
class MethodFigures:
    method: str
    runs: list[RunFigures]

    def values(self, key: str) -> np.ndarray:
        return np.array([r.values.get(key, math.nan) for r in self.runs], dtype=np.float64)

    def mean(self, key: str) -> float:
        v = self.values(key)
        v = v[np.isfinite(v)]
        return float(v.mean()) if v.size else math.nan

    def spread(self, key: str) -> float:
        v = self.values(key)
        v = v[np.isfinite(v)]
        return float(np.ptp(v) / 2) if v.size else math.nan

    def se(self, key: str) -> float:
        """Standard error of the seed mean of a rate: binomial variance per seed plus seed variance."""
        v = self.values(key)
        ok = np.isfinite(v)
        if not ok.any():
            return math.nan
        counts = np.array([r.counts.get(key, math.nan) for r in self.runs], dtype=np.float64)[ok]
        p = np.clip(v[ok], 0.0, 1.0)
        binom = float(np.mean(p * (1 - p) / counts)) if np.all(counts > 0) else 0.0
        between = float(np.var(v[ok], ddof=1)) if v[ok].size > 1 else 0.0
        return math.sqrt((binom + between) / v[ok].size)


def group_by_method(figures: list[RunFigures], order: list[str]) -> list[MethodFigures]:
    return [MethodFigures(m, [f for f in figures if f.method == m]) for m in order
            if any(f.method == m for f in figures)]


def _pm(mf: MethodFigures, key: str, digits: int = 3) -> str:
    mean, spread = mf.mean(key), mf.spread(key)
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.{digits}f} ± {spread:.{digits}f}" if len(mf.runs) > 1 else f"{mean:.{digits}f}"


#: (label, key) rows of the figures table.
TABLE_ROWS = (
    ("entropy, start (first 10% of steps)", "entropy_start"),
    ("entropy, end (last 10%)", "entropy_end"),
    ("entropy end / start", "entropy_ratio"),
    ("training reward, start", "reward_start"),
    ("training reward, end", "reward_end"),
    ("full-credit rate (reward/full), end", "full_rate_end"),
    ("valid-answer rate, end", "valid_rate_end"),
    ("distinct rewarded answers per prompt, end", "distinct_rewarded_end"),
    ("val score (mean held-out reward), step 0", "val_start"),
    ("val score, end (last 10% of evaluations)", "val_end"),
    ("val full-credit rate (val/acc), step 0", "val_full_start"),
    ("val full-credit rate, end", "val_full_end"),
    ("val pass@k (held-out prompts with a full-credit sample), step 0", "val_pass_start"),
    ("val pass@k, end", "val_pass_end"),
    ("R² of R = -a·exp(H) + b (val score vs H)", "law_r2"),
    ("final val score predicted from the first quarter", "pred_final"),
    ("  relative error of that prediction", "pred_rel_error"),
)


def figures_table(methods: list[MethodFigures]) -> str:
    """Markdown table: figures x methods, mean ± spread over seeds."""
    head = "| figure | " + " | ".join(f"{m.method} ({len(m.runs)} seed{'s' if len(m.runs) > 1 else ''})"
                                      for m in methods) + " |"
    lines = [head, "|---|" + "---|" * len(methods)]
    for label, key in TABLE_ROWS:
        lines.append(f"| {label} | " + " | ".join(_pm(m, key) for m in methods) + " |")
    base = next((m for m in methods if m.method == BASELINE), None)
    if base is not None and base.mean("entropy_end") > 0:
        ratios = [m.mean("entropy_end") / base.mean("entropy_end") for m in methods]
        lines.append(f"| end entropy ÷ {BASELINE}'s | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    return "\n".join(lines)


@dataclass
class Bar:
    claim: str
    measured: str
    met: bool | None
    """None: could not be measured (too few runs or points)."""


def check_bars(methods: list[MethodFigures]) -> list[Bar]:
    """The demo's claims against the measured figures (see the module docstring)."""
    by = {m.method: m for m in methods}
    base = by.get(BASELINE)
    others = [m for m in methods if m.method != BASELINE]
    bars: list[Bar] = []
    if base is None:
        return [Bar(f"a {BASELINE} baseline run", "none found", None)]
    r = base.mean("entropy_ratio")
    bars.append(Bar(f"{BASELINE} end entropy < {COLLAPSE_BAR:.0%} of its start", f"{r:.3f}",
                    bool(r < COLLAPSE_BAR) if math.isfinite(r) else None))
    for m in others:
        k = m.mean("entropy_end") / base.mean("entropy_end") if base.mean("entropy_end") > 0 else math.nan
        bars.append(Bar(f"{m.method} end entropy ≥ {KEEP_BAR:g}× {BASELINE}'s", f"{k:.2f}×",
                        bool(k >= KEEP_BAR) if math.isfinite(k) else None))
    for m in others:
        for key, what in (("reward_end", "final training reward"), ("val_end", "final val score"),
                          ("val_full_end", "final val full-credit rate")):
            a, b = m.mean(key), base.mean(key)
            bars.append(Bar(f"{m.method} {what} ≥ {BASELINE}'s", f"{a:.3f} vs {b:.3f}",
                            bool(a >= b) if math.isfinite(a) and math.isfinite(b) else None))
    clear = []
    for m in others:  # the full-credit behaviour, on the training prompts and on the held-out ones
        for key, what in (("full_rate_end", "training"), ("val_full_end", "held-out")):
            diff, se = m.mean(key) - base.mean(key), math.hypot(m.se(key), base.se(key))
            if math.isfinite(diff):
                clear.append((diff > 2 * se, f"{m.method} {what} {diff:+.3f} (2 SE = {2 * se:.3f})"))
    bars.append(Bar("at least one entropy method clearly higher (> 2 SE) on full credit (training or held-out)",
                    "; ".join(t for _, t in clear), any(ok for ok, _ in clear) if clear else None))
    for m in methods:
        diff = m.mean("val_end") - m.mean("val_start")
        se = math.hypot(m.se("val_end"), m.se("val_start"))
        bars.append(Bar(f"{m.method} val score rises > 2 SE from step 0", f"{diff:+.3f} (2 SE = {2 * se:.3f})",
                        bool(diff > 2 * se) if math.isfinite(diff) else None))
    r2 = base.mean("law_r2")
    bars.append(Bar(f"R = -a·exp(H) + b fits {BASELINE} with R² ≥ {FIT_R2_BAR}", f"{r2:.3f}",
                    bool(r2 >= FIT_R2_BAR) if math.isfinite(r2) else None))
    err, pred, actual = base.mean("pred_rel_error"), base.mean("pred_final"), base.mean("pred_actual")
    if math.isfinite(err):
        text = f"{err:.1%} ({pred:.3f} vs {actual:.3f}, fitted on {base.mean('pred_points'):.0f} points)"
    elif math.isfinite(pred):
        text = f"predicted {pred:.3f}, actual {actual:.3f}: a relative error of a zero actual is undefined"
    else:
        text = "no fit (too few points or constant entropy in the first quarter)"
    bars.append(Bar(f"{BASELINE} final val score predicted from the first quarter within {PREDICTION_BAR:.0%}",
                    text, bool(err <= PREDICTION_BAR) if math.isfinite(err) else None))
    return bars


def bars_table(bars: list[Bar]) -> str:
    lines = ["| claim | measured | met |", "|---|---|---|"]
    for b in bars:
        mark = "yes" if b.met else "no" if b.met is False else "n/a"
        lines.append(f"| {b.claim} | {b.measured} | {mark} |")
    return "\n".join(lines)


CURVE_PANELS = (("actor/entropy", "token entropy (nats)", True), ("reward/mean", "training reward", False),
                ("reward/full", "full-credit rate", False), ("div/distinct_rewarded", "distinct rewarded answers / prompt", True),
                (VAL_KEY, "val score (held-out)", False))


def plot_curves(runs: dict[str, list[RunMetrics]], out_png: str) -> str:
    """One panel per metric; per method the seed mean (thick, smoothed) and each seed (thin)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(4.2 * len(CURVE_PANELS), 3.6), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title, from_zero) in zip(axes, CURVE_PANELS):
        for i, (method, method_runs) in enumerate(runs.items()):
            color = colors[i % len(colors)]
            series = [r.series(key) for r in method_runs]
            series = [(s, v) for s, v in series if s.size]
            if not series:
                continue
            for s, v in series:
                ax.plot(s, v, color=color, lw=0.6, alpha=0.3)
            n = min(v.size for _, v in series)
            mean = np.mean([v[:n] for _, v in series], axis=0)
            w = max(1, n // 10) if key != VAL_KEY else 1
            ax.plot(series[0][0][:n], smooth(mean, w), color=color, lw=2.0,
                    marker="o" if key == VAL_KEY else None, ms=3, label=method)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if from_zero:
            ax.set_ylim(bottom=0.0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
