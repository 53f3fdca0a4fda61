"""The ``megacov`` command. Each subcommand lives in its own module and registers an argparse parser.

Subcommand modules are imported only when chosen, so ``megacov doctor`` does not pay for vLLM and
``megacov analyze`` does not pay for megatron. Exit codes: 0 success, 1 failure at run time, 2 bad
configuration or arguments (the message names the offending keys).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# name -> (module, one-line help)
SUBCOMMANDS = {
    "train": ("megacov.cli.train", "run RL (or the SFT warm-start) from a config file; --dry-run checks the layout"),
    "eval": ("megacov.cli.eval", "evaluate a policy on held-out prompt files (avg@k, pass@k)"),
    "convert": ("megacov.cli.convert", "convert checkpoints between Hugging Face and megatron formats"),
    "verify": ("megacov.cli.verify", "check conversion, weight sync or loss exactness on your layout"),
    "analyze": ("megacov.cli.analyze", "fit R = -a*exp(H) + b and report entropy dynamics of runs"),
    "doctor": ("megacov.cli.doctor", "print versions and accelerator support"),
    "demo": ("megacov.cli.demo", "run GRPO vs Clip-Cov vs KL-Cov on the embedded entropy task and report"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megacov", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"megacov: unknown command '{argv[0]}' (choose from {', '.join(SUBCOMMANDS)})",
                  file=sys.stderr)
            return 2
        parser.print_help()
        return 0 if argv else 2
    module_name, help_text = SUBCOMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"megacov {argv[0]}", description=help_text)
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    return int(module.run(args) or 0)
