"""``megacov config CONFIG [key=value ...]``: print the resolved configuration and start nothing.

What a run would use: schema defaults, then the YAML file, then the overrides, as YAML that
``megacov train`` accepts back.
"""
from __future__ import annotations

import argparse

from megacov.cli._common import config_errors_exit_2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None,
                        help="YAML config file (omitted: the built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parallel.tp=2")
    parser.add_argument("--check", action="store_true", help="also check value ranges (as train --dry-run does)")


@config_errors_exit_2
def run(args: argparse.Namespace) -> int:
    from megacov.config import load_config, to_yaml

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]  # only overrides were given
    cfg = load_config(config, overrides)
    if args.check:
        from megacov.config.validate import check_ranges

        check_ranges(cfg)
    print(to_yaml(cfg), end="")
    return 0
