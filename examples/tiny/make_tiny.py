"""Generate the tiny demo's model and data (``megacov train`` also does this on first use).

    python examples/tiny/make_tiny.py [--force]

Writes ``examples/tiny/model`` (a 4-layer, 64-wide Qwen2-style model with random weights and a
character tokenizer) and ``examples/tiny/data/{train,eval,sft}.jsonl`` (disjoint two-digit additions).
"""
from __future__ import annotations

import argparse
import os
import shutil

from megacov.tiny import build_example

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    args = parser.parse_args()
    model, data = os.path.join(HERE, "model"), os.path.join(HERE, "data")
    if args.force:
        shutil.rmtree(model, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
    for name, path in build_example(model, data).items():
        print(f"{name:>5}: {path}")


if __name__ == "__main__":
    main()
