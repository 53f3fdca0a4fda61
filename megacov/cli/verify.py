"""``megacov verify <what> ...``: checks a user runs on their own model and layout.

Each check lives in its own module (imported only when chosen) that defines
``add_arguments(parser)`` and ``run(args) -> int``; this file only dispatches, so adding a check is
one line in :data:`CHECKS`.
"""
from __future__ import annotations

import argparse
import importlib

# name -> (module, one-line help)
CHECKS = {
    "conversion": ("megacov.verify.conversion", "HF vs megatron logits on a random batch at a given TP x PP"),
    "exactness": ("megacov.verify.exactness",
                  "one update step under several TP x PP x DP layouts vs a float64 single-process reference"),
    "sync": ("megacov.verify.sync", "weights synced from the Megatron actor give vLLM the actor's log-probs"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=sorted(CHECKS), help="; ".join(f"{k}: {v[1]}" for k, v in CHECKS.items()))
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the check (see <what> --help)")


def run(args: argparse.Namespace) -> int:
    module_name, help_text = CHECKS[args.what]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"megacov verify {args.what}", description=help_text)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.rest)) or 0)
