"""``megacov train CONFIG [key=value ...] [--dry-run]``."""
from __future__ import annotations

import argparse

from megacov.cli._common import config_errors_exit_2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "every setting with its default and documentation: megacov config, and megacov/config/schema.py"
    parser.add_argument("config", help="YAML config file (e.g. examples/tiny/config.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parallel.tp=2 (anywhere on the line)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config, layout, reward and data files, print the plan, start nothing")


@config_errors_exit_2
def run(args: argparse.Namespace) -> int:
    from megacov.config import load_config
    from megacov.config.validate import validate

    cfg = load_config(args.config, args.overrides)
    from megacov.tiny import prepare_example

    prepare_example(cfg)  # the embedded example's model and data are generated on first use
    plan = validate(cfg)  # ranges, layout, choices
    from megacov.config.validate import check_data, check_reward
    from megacov.runtime.layout import check_colocation

    check_colocation(cfg, plan.world_size)
    memory = _memory_plan(cfg, plan)
    if args.dry_run:  # the plan first, so a layout can be sized before the data is on this machine
        print(plan.table())
        print(_runtime_plan(cfg, plan))
        from megacov.critic.plan import placement_lines

        for line in placement_lines(cfg):  # the critic and the reward model, when the run has them
            print(line)
        if memory is not None:
            print(memory.table())
    check_reward(cfg)  # the reward resolves and every data file reads, before any worker starts
    check_data(cfg)
    if args.dry_run:
        if memory is not None and not memory.fits:
            print("config, layout, reward and data OK, but the memory plan does not fit (dry run: nothing started)")
            return 1
        print("config, layout, reward and data OK (dry run: nothing started)")
        return 0
    if memory is not None and not memory.fits:
        import logging

        logging.getLogger("megacov").warning("memory plan: does not fit: %s (see --dry-run)", memory.failure)
    from megacov.trainer import train

    return train(cfg, plan)


def _memory_plan(cfg, plan):
    """The per-GPU memory plan of a GPU run (None on CPU)."""
    from megacov.config.validate import memory_plan

    return memory_plan(cfg, plan)


def _runtime_plan(cfg, plan) -> str:
    """Devices, bundles, reference and per-engine weight transfer, as the runtime will start them.

    Without a running cluster the dry run decides GPU or CPU from ``parallel.num_gpus`` (or this
    machine's GPUs, as the layout plan does); a run decides from the cluster's resources."""
    from megacov.runtime.layout import plan_table

    source = "parallel.num_gpus" if cfg.parallel.num_gpus is not None else "this machine"
    return plan_table(cfg, plan.world_size, plan.num_gpus > 0, source)
