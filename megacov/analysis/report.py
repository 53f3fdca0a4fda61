"""Figures and the self-contained HTML report of ``megacov analyze``.

The report embeds its figures as base64 PNG so it can be mailed or attached to a CI artifact as a
single file. matplotlib is imported here only, with the Agg backend (no display), and this module is
imported only by the CLI: the live predictor in ``fit.py`` stays free of plotting.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import os
from collections.abc import Iterable, Sequence

import numpy as np

from megacov.analysis.dynamics import smooth
from megacov.analysis.summary import RunAnalysis

FIGURE_NAMES = ("entropy_vs_step", "metric_vs_step", "metric_vs_entropy", "cov_stats")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int) -> list:
    plt = _pyplot()
    cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    return [cycle[i % len(cycle)] for i in range(n)]


def _overlay_window(n: int) -> int:
    """Moving-average width of the smoothed overlays: ~10% of the points, at least 1."""
    return max(1, n // 10)


def plot_entropy(analyses: Sequence[RunAnalysis]):
    """Raw entropy (thin) with a smoothed overlay; the axis starts at 0, so a drift of a third does not
    look like a collapse."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for res, color in zip(analyses, _colors(len(analyses))):
        s, h = res.run.series(res.entropy_key)
        if s.size:
            ax.plot(s, h, color=color, lw=0.8, alpha=0.35)
            ax.plot(s, smooth(h, _overlay_window(h.size)), color=color, lw=1.8, label=res.run.name)
    ax.set_xlabel("step")
    ax.set_ylabel("entropy (nats / token)")
    ax.set_title("Policy entropy (thin: per step, thick: smoothed)")
    ax.set_ylim(bottom=0.0)
    _finish(ax)
    return fig


def plot_metric(analyses: Sequence[RunAnalysis]):
    """Training reward (thin line) and the fitted metric (dots), with the early-fit prediction."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for res, color in zip(analyses, _colors(len(analyses))):
        s, r = res.run.series("reward/mean")
        if s.size:
            ax.plot(s, r, color=color, lw=0.8, alpha=0.25)
            ax.plot(s, smooth(r, _overlay_window(r.size)), color=color, lw=1.2, alpha=0.7)
        s, m = res.run.series(res.metric_key)
        if s.size:
            ax.plot(s, m, "o", ms=3.5, color=color, label=f"{res.run.name}: {res.metric_key}")
        pred = res.prediction
        if pred is not None and pred.steps.size:
            ax.plot(pred.steps, pred.predicted, "--", color=color, lw=1.4,
                    label=f"{res.run.name}: predicted from steps <= {pred.cutoff_step:g}")
            ax.axvline(pred.cutoff_step, color=color, lw=0.6, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("metric (dots) / training reward (line, smoothed)")
    ax.set_title("Performance over training")
    _finish(ax)
    return fig


def plot_law(analyses: Sequence[RunAnalysis]):
    """Metric against entropy with each run's fitted R = -a exp(H) + b and its ceiling."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for res, color in zip(analyses, _colors(len(analyses))):
        if res.steps.size:
            ax.plot(res.entropy, res.metric, "o", ms=3.5, color=color, alpha=0.8, label=res.run.name)
        if res.fit is not None:
            lo = min(0.0, float(res.entropy.min()))
            grid = np.linspace(lo, float(res.entropy.max()) * 1.05 + 1e-9, 200)
            ax.plot(grid, res.fit.predict(grid), "-", color=color, lw=1.4,
                    label=f"fit a={res.fit.a:.3g} b={res.fit.b:.3g} (R²={_fmt(res.fit.r2, 3)})")
            ax.axhline(res.fit.ceiling, color=color, lw=0.8, ls="--")
    ax.set_xlabel("entropy H")
    ax.set_ylabel("metric R")
    ax.set_title("R = -a·exp(H) + b  (dashed: ceiling -a + b)")
    _finish(ax)
    return fig


def plot_cov(analyses: Sequence[RunAnalysis]):
    """Mean covariance of all vs selected tokens, and tokens selected per step; None without data."""
    if not any(res.cov for res in analyses):
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=100)
    for res, color in zip(analyses, _colors(len(analyses))):
        for key, style in (("cov/mean", "-"), ("cov/selected_mean", "--")):
            s, v = res.run.series(key)
            if s.size:
                ax1.plot(s, v, style, color=color, lw=1.2, label=f"{res.run.name}: {key}")
        s, v = res.run.series("cov/num_selected")
        if s.size:
            ax2.plot(s, v, color=color, lw=1.2, label=res.run.name)
    ax1.set_xlabel("step")
    ax1.set_ylabel("Cov(log π, A)")
    ax1.set_title("Covariance: all tokens (solid) vs selected (dashed)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("tokens")
    ax2.set_title("Tokens touched by Clip-Cov / KL-Cov")
    _finish(ax1)
    _finish(ax2)
    return fig


def _finish(ax) -> None:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    ax.figure.tight_layout()


def save_figures(analyses: Sequence[RunAnalysis], out_dir: str) -> dict[str, str]:
    """Write the PNG figures; returns ``name -> path`` for those that have data."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    makers = dict(zip(FIGURE_NAMES, (plot_entropy, plot_metric, plot_law, plot_cov)))
    paths = {}
    for name, make in makers.items():
        fig = make(analyses)
        if fig is None:
            continue
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path)
        plt.close(fig)
        paths[name] = path
    return paths


def _fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, (int, np.integer)) or (float(x).is_integer() and abs(x) < 1e15):
        return str(int(x))
    return f"{float(x):.{digits}g}"


def _get(d: dict | None, *path):
    for key in path:
        if d is None:
            return None
        d = d.get(key) if isinstance(d, dict) else None
    return d


# (row label, function of RunAnalysis -> value) for the side-by-side table.
COMPARISON_ROWS = (
    ("metric fitted", lambda r: r.metric_key),
    ("(H, R) pairs", lambda r: int(r.steps.size)),
    ("a", lambda r: r.fit.a if r.fit else None),
    ("b", lambda r: r.fit.b if r.fit else None),
    ("ceiling -a + b", lambda r: r.fit.ceiling if r.fit else None),
    ("R² (all points)", lambda r: r.fit.r2 if r.fit else None),
    ("fit RMSE", lambda r: r.fit.rmse if r.fit else None),
    ("prediction: fit until step", lambda r: r.prediction.cutoff_step if r.prediction else None),
    ("prediction: RMSE on later steps", lambda r: r.prediction.rmse if r.prediction else None),
    ("prediction: final-step error", lambda r: r.prediction.final_error if r.prediction else None),
    ("entropy start → end (first / last 10% of steps)", lambda r: _levels_arrow(r, "entropy")),
    ("entropy end / start", lambda r: _get(r.dynamics, "entropy", "levels", "ratio")),
    ("metric start → end", lambda r: _levels_arrow(r, "metric")),
    ("reward start → end", lambda r: _levels_arrow(r, "reward")),
    ("share of entropy change in early steps", lambda r: _early_share(r, "entropy")),
    ("share of metric change in early steps", lambda r: _early_share(r, "metric")),
    ("share of reward change in early steps", lambda r: _early_share(r, "reward")),
    ("mean cov, all tokens", lambda r: _get(r.cov, "mean_mean_over_steps")),
    ("mean cov, selected tokens", lambda r: _get(r.cov, "selected_mean_mean_over_steps")),
    ("selected / all", lambda r: _get(r.cov, "selected_over_all")),
    ("tokens touched (total)", lambda r: _get(r.cov, "tokens_touched")),
    *((label, (lambda key: lambda r: _mean_over_steps(r, key))(key)) for label, key in (
        ("clip fraction (mean)", "actor/clipfrac"),
        ("GSPO sequence ratio (mean)", "actor/seq_ratio"),
        ("high-entropy tokens kept (share)", "high_entropy/frac"),
        ("high-entropy threshold (mean)", "high_entropy/threshold"),
        ("entropy-advantage bonus (mean)", "actor/entropy_adv_bonus"),
        ("rollout IS weights truncated (share)", "rollout_corr/truncated_frac"),
        ("rollout tokens masked (share)", "rollout_corr/masked_frac"),
    )),
)


def _mean_over_steps(r, key: str) -> float | None:
    """Mean of a per-step method metric (None when the run does not log it)."""
    _, values = r.run.series(key)
    return float(values.mean()) if values.size else None


def _arrow(a, b) -> str | None:
    return None if a is None or b is None else f"{_fmt(a)} → {_fmt(b)}"


#: Shown instead of a share when the total change is within twice its standard error.
NO_CHANGE = "no significant change"


def _levels_arrow(res: RunAnalysis, what: str) -> str | None:
    lv = _get(res.dynamics, what, "levels")
    if not lv:
        return None
    text = f"{_fmt(lv['start'], 3)} → {_fmt(lv['end'], 3)}"
    return text if lv["significant"] else f"{text} (not significant)"


def _early_share(res: RunAnalysis, what: str):
    lv = _get(res.dynamics, what, "levels")
    if lv and not lv["significant"]:
        return NO_CHANGE
    return _get(res.dynamics, what, "early", "share")


def format_value(value) -> str:
    """Table text of a value: strings as they are, numbers to 4 significant digits, missing as —."""
    return value if isinstance(value, str) else _fmt(value)


def _cell(value) -> str:
    return html.escape(format_value(value))


def _table(header: Sequence[str], rows: Iterable[Sequence], css: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def comparison_table(analyses: Sequence[RunAnalysis]) -> str:
    header = ["", *(res.run.name for res in analyses)]
    rows = [[label, *(fn(res) for res in analyses)] for label, fn in COMPARISON_ROWS]
    return _table(header, rows, "comparison")


def _phase_table(res: RunAnalysis) -> str:
    blocks = []
    for what in ("entropy", "metric", "reward"):
        summary = res.dynamics.get(what)
        if not summary or not summary["phases"]:
            continue
        rows = [[f"{p['step_start']:g}–{p['step_end']:g}", p["start"], p["end"], p["change"], p["share"]]
                for p in summary["phases"]]
        blocks.append(f"<h4>{html.escape(what)} by phase</h4>"
                      + _table(["steps", "start", "end", "change", "share of total"], rows))
    return "".join(blocks)


def _fit_table(res: RunAnalysis) -> str:
    if res.fit is None:
        return ""
    rows = [["all points", res.fit.n, res.fit.a, res.fit.b, res.fit.ceiling, res.fit.r2, res.fit.rmse,
             None, None, None]]
    pred = res.prediction
    if pred is not None:
        rows.append([f"steps <= {pred.cutoff_step:g}", pred.fit.n, pred.fit.a, pred.fit.b,
                     pred.fit.ceiling, pred.fit.r2, pred.fit.rmse, int(pred.steps.size), pred.rmse,
                     pred.final_error])
    return ("<h4>fit and prediction</h4>"
            + _table(["fitted on", "n", "a", "b", "ceiling", "R²", "fit RMSE", "predicted points",
                      "prediction RMSE", "final-step error"], rows))


def _cov_table(res: RunAnalysis) -> str:
    if not res.cov:
        return ""
    keys = [k.split("/", 1)[1] for k in res.cov["keys"]]
    n = len(res.cov[f"{keys[0]}_by_phase"])
    rows = [[f"phase {i + 1}", *(res.cov[f"{k}_by_phase"][i] for k in keys)] for i in range(n)]
    rows.append(["whole run", *(res.cov[f"{k}_mean_over_steps"] for k in keys)])
    return "<h4>covariance statistics (means)</h4>" + _table(["", *(f"cov/{k}" for k in keys)], rows)


def _run_section(res: RunAnalysis) -> str:
    name = html.escape(res.run.name)
    head = (f'<section class="run" id="run-{name}"><h3>{name}</h3><p class="src">'
            f"{html.escape(res.run.source)} · {res.run.n_rows} rows · entropy "
            f"<code>{html.escape(res.entropy_key)}</code>, metric <code>{html.escape(res.metric_key)}</code></p>")
    parts = [head]
    for msg in filter(None, (res.fit_error, res.prediction_error)):
        parts.append(f'<p class="problem">{html.escape(msg)}</p>')
    if res.notes or res.run.warnings:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in [*res.notes, *res.run.warnings])
        parts.append(f'<ul class="notes">{items}</ul>')
    parts.append(_fit_table(res))
    parts.append(_phase_table(res))
    parts.append(_cov_table(res))
    if res.fit is not None:
        rows = [[s, h, r, f, r - f] for s, h, r, f in
                zip(res.steps, res.entropy, res.metric, res.fit.predict(res.entropy))]
        parts.append("<details><summary>fit residuals</summary>"
                     + _table(["step", "entropy", "metric", "fitted", "residual"], rows) + "</details>")
    parts.append("</section>")
    return "".join(parts)


CSS = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1150px;color:#222}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #bbb;padding:3px 8px;
font-size:13px;text-align:right}th{background:#eef}td:first-child{text-align:left}
img{max-width:100%;border:1px solid #ddd;margin:6px 0}.problem{color:#a00}.notes{color:#850;font-size:13px}
.src{color:#666;font-size:12px}code{background:#f4f4f4;padding:0 3px}
"""


def render_html(analyses: Sequence[RunAnalysis], figures: dict[str, str], *,
                warnings: Sequence[str] = (), options_text: str = "") -> str:
    """The whole report as one HTML string with the PNGs inlined."""
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    imgs = []
    for name, path in figures.items():
        with open(path, "rb") as fh:
            data = base64.b64encode(fh.read()).decode("ascii")
        imgs.append(f'<figure><img id="fig-{name}" alt="{html.escape(name)}" '
                    f'src="data:image/png;base64,{data}"></figure>')
    warn = ""
    if warnings:
        warn = '<ul class="notes">' + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul>"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>megacov entropy analysis</title><style>{CSS}</style></head><body>"
        "<h1>Entropy analysis</h1>"
        f'<p class="src">generated {when} by megacov analyze {html.escape(options_text)}</p>'
        "<p>Fitted law: R = -a·exp(H) + b (Cui et al. 2025), with R the metric and H the mean token "
        "entropy; the ceiling -a + b is the performance the law predicts once entropy is exhausted. "
        "Errors are predicted minus actual, in the metric's units.</p>"
        f"{warn}<h2>Runs side by side</h2>{comparison_table(analyses)}"
        f"<h2>Figures</h2>{''.join(imgs)}"
        f"<h2>Per run</h2>{''.join(_run_section(res) for res in analyses)}"
        "</body></html>"
    )


def write_report(analyses: Sequence[RunAnalysis], out_dir: str, *, warnings: Sequence[str] = (),
                 options_text: str = "") -> tuple[str, dict[str, str]]:
    """Figures plus ``report.html`` in ``out_dir``; returns the report path and the figure paths."""
    figures = save_figures(analyses, out_dir)
    path = os.path.join(out_dir, "report.html")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(render_html(analyses, figures, warnings=warnings, options_text=options_text))
    return path, figures
