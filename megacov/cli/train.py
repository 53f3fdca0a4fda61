"""``megacov train CONFIG [key=value ...] [--dry-run]``."""
from __future__ import annotations

import argparse

from megacov.cli._common import config_errors_exit_2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (e.g. examples/tiny/config.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parallel.tp=2")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate config and parallel layout, print the plan, start nothing")


@config_errors_exit_2
def run(args: argparse.Namespace) -> int:
    from megacov.config import load_config
    from megacov.config.validate import validate

    cfg = load_config(args.config, args.overrides)
    from megacov.tiny import prepare_example

    prepare_example(cfg)  # the embedded example's model and data are generated on first use
    plan = validate(cfg)
    if args.dry_run:
        print(plan.table())
        from megacov.critic.plan import placement_lines

        for line in placement_lines(cfg):  # the critic and the reward model, when the run has them
            print(line)
        print("config and layout OK (dry run: nothing started)")
        return 0
    from megacov.trainer import train

    return train(cfg, plan)
