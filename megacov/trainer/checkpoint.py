"""Checkpoint folders that are either complete or absent.

A checkpoint is written into ``checkpoints/.tmp-step_<N>/`` -- the actor and optimizer by every
training rank through megatron ``dist_checkpointing`` (``actor/``), per-rank RNG states (``rng/``),
then the driver's ``trainer_state.json`` (step, data position, entropy-controller state, driver RNG)
and last a ``COMPLETE`` marker -- and only then renamed to ``step_<N>/``. A rename within one
directory is atomic, so a kill at any moment leaves either the previous checkpoints or the new one,
never a half one that ``trainer.resume=auto`` could pick up. Leftover temp folders are removed on
start.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import time
from typing import Any, Optional

import numpy as np

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
DRIVER_RNG_FILE = "driver_rng.pkl"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (missing, incomplete); the message names its path."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


def driver_rng_state() -> dict[str, Any]:
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_driver_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class CheckpointManager:
    """Names, writes, finds and prunes the checkpoints of one run (``<run_dir>/checkpoints``)."""

    def __init__(self, run_dir: str, keep_last: int) -> None:
        self.root = os.path.join(run_dir, "checkpoints")
        self.keep_last = keep_last
        os.makedirs(self.root, exist_ok=True)

    def step_dir(self, step: int) -> str:
        return os.path.join(self.root, f"step_{step:08d}")

    def complete(self) -> list[tuple[int, str]]:
        """``(step, path)`` of every complete checkpoint, oldest first."""
        out = []
        for name in os.listdir(self.root):
            m = _STEP_DIR.match(name)
            path = os.path.join(self.root, name)
            if m and os.path.isfile(os.path.join(path, COMPLETE)):
                out.append((int(m.group(1)), path))
        return sorted(out)

    def latest(self) -> Optional[str]:
        found = self.complete()
        return found[-1][1] if found else None

    def remove_partial(self) -> list[str]:
        """Delete temp folders left by a killed save; returns what was removed."""
        removed = []
        for name in os.listdir(self.root):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
                removed.append(name)
        return removed

    def resolve_resume(self, resume: str) -> Optional[str]:
        """The checkpoint ``trainer.resume`` asks for: ``auto`` (latest complete or None), ``never``,
        or an explicit path that must be complete."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        path = os.path.abspath(resume)
        if not os.path.isdir(path):
            raise CheckpointError(f"trainer.resume={resume}: no such checkpoint folder")
        if not os.path.isfile(os.path.join(path, COMPLETE)):
            raise CheckpointError(f"trainer.resume={resume}: checkpoint is incomplete (no {COMPLETE} marker)")
        return path

    def begin(self, step: int) -> str:
        """A fresh temp folder for checkpoint ``step`` (where the ranks write their shards)."""
        tmp = os.path.join(self.root, f".tmp-step_{step:08d}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        return tmp

    def commit(self, tmp: str, step: int, trainer_state: dict[str, Any]) -> str:
        """Write the driver's state and the marker into ``tmp``, rename it into place, prune."""
        _write_json(os.path.join(tmp, STATE_FILE), trainer_state)
        with open(os.path.join(tmp, DRIVER_RNG_FILE), "wb") as fh:
            pickle.dump(driver_rng_state(), fh)
        _write_json(os.path.join(tmp, COMPLETE), {"step": step, "time": time.time()})
        _fsync_dir(tmp)
        final = self.step_dir(step)
        if os.path.exists(final):  # a re-run of the same step after a resume
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        self.prune()
        return final

    def prune(self) -> None:
        if self.keep_last <= 0:
            return
        for _, path in self.complete()[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)


def load_trainer_state(path: str) -> dict[str, Any]:
    """The driver's state of a complete checkpoint; also restores the driver's RNG."""
    state_file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_file):
        raise CheckpointError(f"{path}: no {STATE_FILE}")
    with open(state_file) as fh:
        state = json.load(fh)
    rng_file = os.path.join(path, DRIVER_RNG_FILE)
    if os.path.isfile(rng_file):
        with open(rng_file, "rb") as fh:
            set_driver_rng_state(pickle.load(fh))
    return state
