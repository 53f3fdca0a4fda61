"""``megacov verify <check>``: checks a user runs on their own model and layout before training.

Each check lives in the module that owns the code it checks and defines ``add_arguments(parser)`` and
``run(args) -> int``; it is imported only when chosen.
"""
from __future__ import annotations

import argparse
import importlib

from megacov.cli._common import fail

# name -> (module, one-line help)
CHECKS = {
    "sync": ("megacov.rollout.verify", "weights synced from the Megatron actor give vLLM the actor's log-probs"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="check", metavar="CHECK")
    for name, (module_name, help_text) in CHECKS.items():
        check = sub.add_parser(name, help=help_text, description=help_text)
        check.set_defaults(_check_module=module_name)
        importlib.import_module(module_name).add_arguments(check)


def run(args: argparse.Namespace) -> int:
    module_name = getattr(args, "_check_module", None)
    if module_name is None:
        return fail(f"megacov verify needs a check (choose from {', '.join(CHECKS)})", 2)
    return int(importlib.import_module(module_name).run(args) or 0)
