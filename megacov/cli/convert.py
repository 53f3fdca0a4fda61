"""``megacov convert``."""
from __future__ import annotations

import argparse

from megacov.cli._common import not_available


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs="*")


def run(args: argparse.Namespace) -> int:
    del args
    return not_available("megacov convert")
