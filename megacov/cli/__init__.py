"""The ``megacov`` command line: RL post-training with exact Clip-Cov / KL-Cov entropy control.

Each subcommand lives in its own module and registers an argparse parser; subcommand modules are
imported only when chosen, so ``megacov doctor`` does not pay for vLLM and ``megacov analyze`` does
not pay for megatron. Exit codes: 0 success, 1 failure at run time (one line; the traceback is in the
run's train.log), 2 bad configuration or arguments (the message names the offending key, file or row),
130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

DESCRIPTION = "megacov: RL post-training for LLMs on Megatron-core, vLLM and Ray, with exact Clip-Cov / KL-Cov."
EPILOG = """first steps:
  megacov doctor                                      what is installed, which accelerators work
  megacov train examples/tiny/config.yaml --dry-run   check config, layout, reward and data; start nothing
  megacov train examples/tiny/config.yaml trainer.total_steps=5
  megacov config examples/tiny/config.yaml parallel.tp=2   print the resolved config

key=value overrides may appear anywhere after the config file. 'megacov COMMAND --help' shows each
command's options with their defaults."""

# name -> (module, one-line help)
SUBCOMMANDS = {
    "train": ("megacov.cli.train", "run RL (or the SFT warm-start) from a config file; --dry-run checks everything"),
    "config": ("megacov.cli.config", "print the resolved config (defaults <- YAML <- key=value) and start nothing"),
    "eval": ("megacov.cli.eval", "evaluate a policy on held-out prompt files (avg@k, pass@k)"),
    "convert": ("megacov.cli.convert", "convert checkpoints between Hugging Face and megatron formats"),
    "verify": ("megacov.cli.verify", "check conversion, weight sync or loss exactness on your layout"),
    "analyze": ("megacov.cli.analyze", "fit R = -a*exp(H) + b and report entropy dynamics of runs"),
    "doctor": ("megacov.cli.doctor", "print versions and accelerator support"),
    "demo": ("megacov.cli.demo", "run GRPO vs Clip-Cov vs KL-Cov on the embedded entropy task and report"),
}


def build_parser() -> argparse.ArgumentParser:
    from megacov import __version__

    parser = argparse.ArgumentParser(prog="megacov", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"megacov {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _parse(sub: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Options and positionals in any order (``train CONFIG --dry-run k=v``), where the parser allows it;
    parsers with sub-commands or pass-through arguments parse as usual."""
    try:
        return sub.parse_intermixed_args(argv)
    except TypeError:
        return sub.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "--version") or argv[0] not in SUBCOMMANDS:
        parser = build_parser()
        if argv and argv[0] == "--version":
            parser.parse_args(argv[:1])
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"megacov: unknown command '{argv[0]}' (choose from {', '.join(SUBCOMMANDS)})",
                  file=sys.stderr)
            return 2
        parser.print_help()
        return 0 if argv else 2
    module_name, help_text = SUBCOMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"megacov {argv[0]}", description=help_text,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    module.add_arguments(sub)
    args = _parse(sub, argv[1:])
    from megacov.cli._common import fail

    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - a run-time failure is one line; train.log has the traceback
        from megacov.trainer.faults import RunFailed

        if isinstance(exc, RunFailed):
            return fail(str(exc), 1)
        raise
