"""The RL trainer: ``train(cfg, plan)`` runs ``megacov train`` (RL, or the SFT warm-start alone).

The loop itself is :mod:`megacov.trainer.loop`; setup, resume and teardown are in
:mod:`megacov.trainer.run`. Nothing heavy is imported until :func:`train` is called.
"""
from __future__ import annotations

from typing import Any


def train(cfg: Any, plan: Any) -> int:
    """Run the job described by ``cfg`` on the layout ``plan`` (from ``megacov.config.validate``)."""
    from megacov.trainer.run import run

    return run(cfg, plan)


__all__ = ["train"]
