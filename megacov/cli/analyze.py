"""``megacov analyze RUN_DIR [RUN_DIR ...]``: entropy-performance law and entropy dynamics of runs.

Fits R = -a*exp(H) + b per run, predicts the later steps from a fit on the early ones, summarises how
entropy, metric and reward changed, and writes PNG figures plus a self-contained ``report.html``.
Runs that cannot be read or fitted are reported and skipped; the exit code is 2 only when nothing
could be analysed. ``--demo DIR`` writes three synthetic runs (ppo, clip_cov, kl_cov) drawn from a
known law into DIR and analyses them, which shows the report without any training.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from megacov.cli._common import fail


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} must be in (0, 1)")
    return value


def _fit_until(text: str) -> int | float:
    """An integer is a step; anything else must be a fraction of the step span in (0, 1)."""
    try:
        return int(text)
    except ValueError:
        return _fraction(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megacov.analysis.fit import LOSSES
    from megacov.analysis.summary import DEFAULT_ENTROPY_KEY, DEFAULT_REWARD_KEY

    parser.add_argument("runs", nargs="*", metavar="RUN",
                        help="run directories (with metrics.jsonl or metrics.csv) or JSONL/CSV files")
    parser.add_argument("--entropy-key", default=DEFAULT_ENTROPY_KEY, help="entropy column (H)")
    parser.add_argument("--metric-key", default=None,
                        help="metric column (R); default val/acc, or reward/acc when a run has "
                             "fewer than 3 val/acc points")
    parser.add_argument("--reward-key", default=DEFAULT_REWARD_KEY, help="training reward column")
    parser.add_argument("--step-key", default=None,
                        help="step column; default: the first of step, _step, global_step, ...")
    parser.add_argument("--fit-until", type=_fit_until, default=0.25,
                        help="prediction mode: fit on steps up to this fraction of the run (0.25) "
                             "or this step (an integer), predict the rest")
    parser.add_argument("--early-frac", type=_fraction, default=0.1,
                        help="report the share of total change that happened in this first fraction")
    parser.add_argument("--phases", type=_positive_int, default=4,
                        help="number of equal step spans for the per-phase entropy drop")
    parser.add_argument("--loss", choices=LOSSES, default="soft_l1", help="robust loss of the fit")
    parser.add_argument("--out", default=None,
                        help="output folder (default: 'analysis' beside the first run, not inside it)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument("--no-report", action="store_true", help="skip the figures and report.html")
    parser.add_argument("--demo", metavar="DIR", default=None,
                        help="write synthetic ppo/clip_cov/kl_cov runs into DIR and analyse them")


def _default_out(first: str) -> str:
    """``analysis`` next to the first run: a run folder holds what training wrote, nothing else."""
    first = os.path.abspath(first)
    run_dir = first if os.path.isdir(first) else os.path.dirname(first)
    return os.path.join(os.path.dirname(run_dir), "analysis")


def _warn(message: str) -> None:
    print(f"megacov: warning: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from megacov.analysis.runs import RunReadError, read_run
    from megacov.analysis.summary import AnalysisOptions, analyze_run, to_jsonable

    paths = list(args.runs)
    if args.demo:
        from megacov.analysis.synthetic import write_demo_runs

        paths = write_demo_runs(args.demo) + paths
    if not paths:
        return fail("give at least one run directory or metrics file (or --demo DIR)")
    options = AnalysisOptions(entropy_key=args.entropy_key, metric_key=args.metric_key,
                              reward_key=args.reward_key, fit_until=args.fit_until,
                              early_frac=args.early_frac, n_phases=args.phases, loss=args.loss)
    problems: list[str] = []
    analyses = []
    names: set[str] = set()
    for path in paths:
        try:
            run_metrics = read_run(path, step_key=args.step_key)
        except RunReadError as exc:
            problems.append(f"skipped {exc}")
            continue
        run_metrics.name = _unique(run_metrics.name, names)
        res = analyze_run(run_metrics, options)
        for message in [*run_metrics.warnings, *res.notes]:
            _warn(f"{run_metrics.name}: {message}")
        for message in filter(None, (res.fit_error, res.prediction_error)):
            _warn(f"{run_metrics.name}: {message}")
        if res.analysable:
            analyses.append(res)
        else:
            problems.append(f"{run_metrics.name}: nothing to analyse (no finite '{options.entropy_key}' "
                            f"or '{res.metric_key}' values)")
    for message in problems:
        _warn(message)
    if not analyses:
        return fail("nothing could be analysed" + (f": {problems[-1]}" if problems else ""))
    demo_only = args.demo and not args.runs
    out_dir = args.out or (os.path.join(args.demo, "analysis") if demo_only else _default_out(paths[0]))
    report = None
    figures: dict[str, str] = {}
    if not args.no_report:
        try:
            report, figures = _write(analyses, out_dir, problems, args)
        except OSError as exc:
            return fail(f"cannot write the report to {out_dir}: {exc.strerror or exc}")
    result = {"runs": [res.as_dict() for res in analyses], "problems": problems,
              "out": out_dir if report else None, "report": report, "figures": figures}
    if args.json:
        print(json.dumps(to_jsonable(result), indent=1, allow_nan=False))
    else:
        print(_text_summary(analyses))
        if report:
            print(f"report: {report}")
    return 0


def _write(analyses, out_dir: str, problems: list[str], args: argparse.Namespace):
    from megacov.analysis.report import write_report

    opts = (f"(entropy {args.entropy_key}, fit-until {args.fit_until}, early-frac {args.early_frac}, "
            f"loss {args.loss})")
    return write_report(analyses, out_dir, warnings=problems, options_text=opts)


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 2
    while candidate in taken:
        candidate, i = f"{name}-{i}", i + 1
    taken.add(candidate)
    return candidate


def _text_summary(analyses) -> str:
    """A fixed-width side-by-side table of the headline numbers."""
    from megacov.analysis.report import COMPARISON_ROWS, format_value

    names = [res.run.name for res in analyses]
    rows = [[label, *(format_value(fn(res)) for res in analyses)] for label, fn in COMPARISON_ROWS]
    widths = [max(len(r[i]) for r in [["", *names], *rows]) for i in range(len(names) + 1)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [["", *names], *rows]]
    return "\n".join(lines)
