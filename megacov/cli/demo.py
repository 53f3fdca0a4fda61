"""``megacov demo entropy``: the paper's entropy result on a CPU, in one command.

Runs GRPO (the baseline, ``policy_loss=ppo``), Clip-Cov and KL-Cov on the embedded exploration task
(:mod:`megacov.tasks.explore`) for two RL seeds each, all from one cached warm-start, then writes one
report into the output folder:

* ``report.md`` -- the figures table (mean ± spread over seeds), the claims checked against them,
  and the side-by-side ``megacov analyze`` summary;
* ``curves.png`` -- entropy, reward, full-credit rate, distinct answers and val/acc per method;
* ``analysis/report.html`` -- the full ``megacov analyze`` report of every run;
* ``figures.json`` -- every number, per run.

Each run is a ``megacov train`` subprocess (its own Ray session, as a user would run it); a run
that finished is kept and not rerun, so an interrupted demo continues where it stopped, and
``--methods`` / ``--seeds`` run parts of it. ``--quick`` runs GRPO and Clip-Cov for one seed and
fewer steps (a few minutes). The RL seed sets ``rollout.seed``, ``data.seed`` and ``algorithm.seed``;
``trainer.seed`` stays fixed so that every run starts from the same warm-start.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from megacov.cli._common import fail

#: method -> the overrides that select it (the baseline is plain PPO-clip with GRPO advantages).
METHODS = {"grpo": ["algorithm.policy_loss=ppo"], "clip_cov": ["algorithm.policy_loss=clip_cov"],
           "kl_cov": ["algorithm.policy_loss=kl_cov"]}
DEFAULT_CONFIG = os.path.join("examples", "entropy", "config.yaml")
FULL = {"methods": "grpo,clip_cov,kl_cov", "seeds": "0,1", "steps": None, "out": "runs/entropy-demo"}
QUICK = {"methods": "grpo,clip_cov", "seeds": "0", "steps": 40, "out": "runs/entropy-demo-quick"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=["entropy"], help="the demo to run")
    parser.add_argument("--quick", action="store_true",
                        help=f"GRPO and Clip-Cov, seed 0, {QUICK['steps']} steps (a few minutes)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="base config (default: %(default)s)")
    parser.add_argument("--out", default=None, help=f"output folder (default: {FULL['out']}, quick: {QUICK['out']})")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--seeds", default=None, help="comma-separated RL seeds (default 0,1; quick 0)")
    parser.add_argument("--steps", type=int, default=None, help="RL steps per run (default: the config's)")
    parser.add_argument("--report-only", action="store_true", help="only (re)write the report from finished runs")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides applied to every run (right after 'entropy')")


def _plan(args: argparse.Namespace) -> tuple[list[str], list[int], int | None, str]:
    preset = QUICK if args.quick else FULL
    methods = [m.strip() for m in (args.methods or preset["methods"]).split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    try:
        seeds = [int(s) for s in (args.seeds or preset["seeds"]).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got '{args.seeds}'") from None
    steps = args.steps if args.steps is not None else preset["steps"]
    if steps is not None and steps < 4:
        raise ValueError(f"--steps must be at least 4, got {steps}")
    return methods, seeds, steps, args.out or preset["out"]


def run(args: argparse.Namespace) -> int:
    from megacov.config import ConfigError, load_config

    try:
        methods, seeds, steps, out = _plan(args)
    except ValueError as exc:
        return fail(str(exc))
    if not os.path.isfile(args.config):
        return fail(f"config not found: {args.config} (run from the repository root or pass --config)")
    base = [*args.overrides, f"trainer.output_dir={out}"] + ([f"trainer.total_steps={steps}"] if steps else [])
    try:
        cfg = load_config(args.config, base)
    except ConfigError as exc:
        return fail(str(exc))
    _prepare(cfg)
    os.makedirs(out, exist_ok=True)
    runs = [(m, s, f"{m}-s{s}") for m in methods for s in seeds]
    start = time.perf_counter()
    if not args.report_only:
        for method, seed, name in runs:
            if _finished(os.path.join(out, name), cfg.trainer.total_steps):
                print(f"[demo] {name}: finished earlier, kept", flush=True)
                continue
            t_run = time.perf_counter()
            code = _train(args.config, [*base, *METHODS[method], f"trainer.name={name}", f"rollout.seed={seed}",
                                        f"data.seed={seed}", f"algorithm.seed={seed}"], out, name, start)
            _record_time(out, name, time.perf_counter() - t_run)
            if code != 0:
                return fail(f"run {name} failed (exit {code}); its log: {os.path.join(out, name + '.log')}",
                            code=1)
    done = [(m, s, n) for m, s, n in runs if _finished(os.path.join(out, n), cfg.trainer.total_steps)]
    if not done:
        return fail(f"no finished runs in {out}")
    command = "megacov demo entropy " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["demo", "entropy"] else [])
    report = write_demo_report(cfg, out, done, command=command.strip(), elapsed=_recorded_time(out, done))
    print(f"[demo] report: {report}")
    return 0


def _prepare(cfg) -> None:
    """Generate the explore task's model and data where the config expects them, if missing."""
    if cfg.reward.name != "explore":
        return
    from megacov.tasks.explore import build_explore_example

    data_dirs = {os.path.dirname(p) for p in [*cfg.data.train_files, *cfg.data.eval_files, *cfg.data.sft_files]}
    for data_dir in sorted(data_dirs):
        build_explore_example(cfg.model.path, data_dir)


def _record_time(out: str, name: str, seconds: float) -> None:
    """Wall time of each run (the first includes the warm-start) in ``timings.json``."""
    path = os.path.join(out, "timings.json")
    times = _read_times(out)
    times[name] = round(seconds, 1)
    with open(path + ".tmp", "w") as fh:
        json.dump(times, fh, indent=1)
    os.replace(path + ".tmp", path)


def _read_times(out: str) -> dict[str, float]:
    try:
        with open(os.path.join(out, "timings.json")) as fh:
            return {str(k): float(v) for k, v in json.load(fh).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _recorded_time(out: str, runs: list[tuple[str, int, str]]) -> float:
    times = _read_times(out)
    return sum(times.get(name, 0.0) for _, _, name in runs)


def _finished(run_dir: str, total_steps: int) -> bool:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return False
    last = 0
    with open(path) as fh:
        for line in fh:
            try:
                last = max(last, int(json.loads(line).get("step", 0)))
            except (ValueError, AttributeError):
                continue
    return last >= total_steps


def _train(config: str, overrides: list[str], out: str, name: str, start: float) -> int:
    """One ``megacov train`` subprocess; a leftover unfinished run folder is removed first."""
    shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    log_path = os.path.join(out, f"{name}.log")
    print(f"[demo] {name}: training ({time.perf_counter() - start:.0f} s elapsed), log {log_path}", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.call([sys.executable, "-m", "megacov", "train", config, *overrides],
                               stdout=log, stderr=subprocess.STDOUT)
    print(f"[demo] {name}: exit {code} after {time.perf_counter() - t0:.0f} s", flush=True)
    return code


def write_demo_report(cfg, out: str, runs: list[tuple[str, int, str]], *, command: str, elapsed: float) -> str:
    """Figures, claims, analyze comparison and curves of the finished runs; returns report.md's path."""
    from megacov.analysis import demo
    from megacov.analysis.report import write_report
    from megacov.analysis.runs import read_run
    from megacov.analysis.summary import AnalysisOptions, analyze_run, to_jsonable
    from megacov.cli.analyze import _text_summary

    eval_rows = 0
    for path in cfg.data.eval_files:
        with open(path) as fh:
            eval_rows += sum(1 for line in fh if line.strip())
    metrics = {name: read_run(os.path.join(out, name)) for _, _, name in runs}
    figures = [demo.run_figures(metrics[name], m, s, batch_samples=cfg.data.batch_size * cfg.rollout.n,
                                eval_samples=eval_rows * cfg.trainer.eval_n) for m, s, name in runs]
    order = list(dict.fromkeys(m for m, _, _ in runs))
    methods = demo.group_by_method(figures, order)
    bars = demo.check_bars(methods)
    analyses = [analyze_run(metrics[name], AnalysisOptions(metric_key=demo.VAL_KEY)) for _, _, name in runs]
    html, _ = write_report(analyses, os.path.join(out, "analysis"))
    curves = demo.plot_curves({m: [metrics[n] for mm, _, n in runs if mm == m] for m in order},
                              os.path.join(out, "curves.png"))
    with open(os.path.join(out, "figures.json"), "w") as fh:
        json.dump(to_jsonable({"runs": [{"name": f.name, "method": f.method, "seed": f.seed, **f.values}
                                        for f in figures],
                               "claims": [vars(b) for b in bars], "command": command}), fh, indent=1)
    intro = (f"`{command}` — {len(runs)} runs, {cfg.trainer.total_steps} RL steps each, "
             f"{cfg.data.batch_size} prompts × {cfg.rollout.n} samples per step; {elapsed / 60:.1f} min of "
             f"training in all (warm-start included). Baseline: **{demo.BASELINE}** (`policy_loss=ppo`), "
             "the run whose entropy is expected to collapse. Cells: mean ± spread (half the range) over seeds.")
    text = "\n".join([
        "# Entropy demo", "", intro, "",
        demo.figures_table(methods), "", "## Claims", "", demo.bars_table(bars), "",
        "## megacov analyze (per run)", "", "```", _text_summary(analyses), "```", "",
        f"Curves: `{os.path.basename(curves)}`; full analysis: `{os.path.relpath(html, out)}`.", ""])
    path = os.path.join(out, "report.md")
    with open(path, "w") as fh:
        fh.write(text)
    print(text)
    return path
