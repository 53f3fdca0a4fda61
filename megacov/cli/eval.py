"""``megacov eval CONFIG [key=value ...] [--model HF_DIR] [--out FILE]``.

Samples ``trainer.eval_n`` responses per prompt of every ``data.eval_files`` dataset at
``trainer.eval_temperature`` with a vLLM engine and scores them with ``reward``: avg@k and pass@k per
dataset, printed as a table and appended as one JSON row to ``--out`` (default
``<output_dir>/<name>/eval.jsonl``). The same code scores the periodic in-training evaluation.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from megacov.cli._common import config_errors_exit_2, fail


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (e.g. examples/tiny/config.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.eval_n=8")
    parser.add_argument("--model", default=None,
                        help="HF directory of the policy (default: model.path; e.g. runs/<name>/hf)")
    parser.add_argument("--out", default=None, help="JSONL file the result row is appended to")


@config_errors_exit_2
def run(args: argparse.Namespace) -> int:
    from megacov.config import load_config
    from megacov.config.validate import validate
    from megacov.data import DataError
    from megacov.rewards import RewardSpecError

    cfg = load_config(args.config, args.overrides)
    if args.model is not None:
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            return fail(f"--model {args.model}: not an HF model directory (no config.json)")
        cfg.model.path = args.model
    from megacov.tiny import prepare_example

    prepare_example(cfg)
    plan = validate(cfg)
    if not cfg.data.eval_files:
        return fail("data.eval_files is empty: nothing to evaluate")
    try:
        result = _evaluate(cfg, plan)
    except (DataError, RewardSpecError) as exc:
        return fail(str(exc))
    k = cfg.trainer.eval_n
    names = sorted({key.split("/")[1] for key in result if key.count("/") == 2})
    print(f"{'dataset':<24} {'avg@' + str(k):>8} {'pass@' + str(k):>8} {'len':>7}")
    for name in names:
        print(f"{name:<24} {result[f'val/{name}/avg@{k}']:>8.4f} {result[f'val/{name}/pass@{k}']:>8.4f} "
              f"{result[f'val/{name}/len_mean']:>7.1f}")
    print(f"{'mean (val/acc)':<24} {result['val/acc']:>8.4f}")
    out = args.out or os.path.join(cfg.trainer.output_dir, cfg.trainer.name, "eval.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "a") as fh:
        fh.write(json.dumps({"model": os.path.abspath(cfg.model.path), "time": time.time(), **result}) + "\n")
    print(f"written to {out}")
    return 0


def _evaluate(cfg, plan) -> dict:
    from megacov.data import load_from_config
    from megacov.runtime.core import Runtime
    from megacov.trainer.evaluate import evaluate, unique_names
    from megacov.trainer.run import EVAL_SEED_OFFSET, _tokenizer, build_reward_manager

    tok = _tokenizer(cfg.model.path)
    sets = {name: load_from_config([path], tok, cfg.data)
            for name, path in zip(unique_names(cfg.data.eval_files), cfg.data.eval_files)}
    runtime = Runtime(cfg, plan)
    runtime.connect()
    rewards, judge_engines = build_reward_manager(cfg, runtime)
    engines = runtime.start_engines(cfg.model.path)
    try:
        ro = cfg.rollout

        def generate(prompts, *, n, temperature, seed):
            flat = engines.generate(prompts, n=n, temperature=temperature, top_p=ro.top_p, top_k=ro.top_k,
                                    max_tokens=ro.max_response_len, stop=list(ro.stop), seed=seed)
            return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

        t = cfg.trainer
        return evaluate(sets, generate, rewards, k=t.eval_n, temperature=t.eval_temperature,
                        seed=t.seed + EVAL_SEED_OFFSET)
    finally:
        runtime.close()
        rewards.close()
        if judge_engines is not None:
            judge_engines.shutdown()
