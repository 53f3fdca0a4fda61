"""Checkpoint folders that are complete, verifiable and never unpickled.

A checkpoint is written into ``checkpoints/.tmp-step_<N>/``: the actor and optimizer by every
training rank through megatron ``dist_checkpointing`` (``actor/``), per-rank RNG states (``rng/``,
safetensors), the driver's ``trainer_state.json`` (step, data position, entropy-controller state) and
its RNG (``driver_rng.json`` + ``driver_rng.safetensors``), then ``MANIFEST.json`` (size and sha256
of every file) and last a ``COMPLETE`` marker -- and only then renamed to ``step_<N>/``. A rename
within one directory is atomic, so a kill at any moment leaves either the previous checkpoints or the
new one. Leftover temp folders are removed on start and after a failed save (a full disk, say).

The manifest is what lets ``trainer.resume=auto`` trust a checkpoint: a folder whose files do not
match it (truncated by a dying file system, a partial copy) is reported and skipped, and the
previous checkpoint is used instead.

Nothing here executes code from a checkpoint: the driver's state is JSON and safetensors.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
STATE_FILE = "trainer_state.json"
DRIVER_RNG_JSON = "driver_rng.json"
DRIVER_RNG_TENSORS = "driver_rng.safetensors"
LEGACY_DRIVER_RNG = "driver_rng.pkl"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_HASH_CHUNK = 8 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (missing, incomplete, damaged); the message names its path."""


class CheckpointSaveError(RuntimeError):
    """A save that failed (disk full, a rank's write error); the partial folder is already removed."""


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


# -- driver RNG: JSON for python/numpy, safetensors for torch ------------------------------------


def driver_rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """``(json_part, tensors)`` of the driver's python, numpy and torch generators."""
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    js = {"python": [version, list(internal), gauss],
          "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]}
    return js, {"torch": torch.get_rng_state()}


def set_driver_rng_state(js: dict[str, Any], tensors: dict[str, Any]) -> None:
    import torch

    version, internal, gauss = js["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    name, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(tensors["torch"])


def _save_driver_rng(folder: str) -> None:
    from safetensors.torch import save_file

    js, tensors = driver_rng_state()
    _write_json(os.path.join(folder, DRIVER_RNG_JSON), js)
    save_file(tensors, os.path.join(folder, DRIVER_RNG_TENSORS))


def _load_driver_rng(folder: str) -> None:
    from safetensors.torch import load_file

    js_path, t_path = os.path.join(folder, DRIVER_RNG_JSON), os.path.join(folder, DRIVER_RNG_TENSORS)
    if os.path.isfile(js_path) and os.path.isfile(t_path):
        with open(js_path) as fh:
            set_driver_rng_state(json.load(fh), load_file(t_path))
    elif os.path.isfile(os.path.join(folder, LEGACY_DRIVER_RNG)):
        log.warning("%s: the driver RNG of this older checkpoint is a pickle file, which megacov does not "
                    "load (it could run code); the driver RNG is not restored", folder)


# -- manifest ----------------------------------------------------------------------------------------


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: str) -> list[str]:
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel not in (MANIFEST, COMPLETE):
                out.append(rel)
    return sorted(out)


def write_manifest(folder: str, with_hashes: bool = True) -> dict[str, Any]:
    """Record size (and sha256) of every file of ``folder`` in ``MANIFEST.json``."""
    files = {}
    for rel in _files(folder):
        path = os.path.join(folder, rel)
        entry: dict[str, Any] = {"size": os.path.getsize(path)}
        if with_hashes:
            entry["sha256"] = _sha256(path)
        files[rel] = entry
    manifest = {"version": 1, "files": files}
    _write_json(os.path.join(folder, MANIFEST), manifest)
    return manifest


def check_manifest(folder: str) -> Optional[str]:
    """``None`` when every file matches the manifest, else what is wrong (first problem). A checkpoint
    without a manifest (written by an older megacov) is accepted as it is."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            files = json.load(fh)["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {MANIFEST} ({exc})"
    for rel, entry in files.items():
        fpath = os.path.join(folder, rel)
        if not os.path.isfile(fpath):
            return f"{rel} is missing"
        size = os.path.getsize(fpath)
        if size != entry["size"]:
            return f"{rel} has {size} bytes, the manifest says {entry['size']}"
        if "sha256" in entry and _sha256(fpath) != entry["sha256"]:
            return f"{rel} does not match its sha256 in the manifest"
    return None


def _is_disk_full(exc: BaseException) -> bool:
    seen: Optional[BaseException] = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "Errno 28" in str(seen) or "No space left on device" in str(seen):
            return True  # a rank's OSError arrives wrapped by Ray as text
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass
class Staged:
    """A checkpoint written into its temp folder, waiting for :meth:`CheckpointManager.commit`."""

    step: int
    tmp: str


class CheckpointManager:
    """Names, writes, finds, validates and prunes the checkpoints of one run (``<run_dir>/checkpoints``)."""

    def __init__(self, run_dir: str, keep_last: int, with_hashes: bool = True) -> None:
        self.root = os.path.join(run_dir, "checkpoints")
        self.keep_last = keep_last
        self.with_hashes = with_hashes
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

    def latest_valid(self) -> Optional[str]:
        """The newest complete checkpoint whose files match its manifest; damaged newer ones are
        reported (and left in place for inspection; the next save of that step replaces them)."""
        found = self.complete()
        damaged: list[str] = []
        for _, path in reversed(found):
            problem = check_manifest(path)
            if problem is None:
                if damaged:
                    log.warning("falling back to %s", path)
                return path
            log.warning("checkpoint %s is damaged: %s", path, problem)
            damaged.append(f"{os.path.basename(path)} ({problem})")
        if damaged:
            raise CheckpointError(f"no intact checkpoint in {self.root}: {'; '.join(damaged)}; start over with "
                                  f"trainer.resume=never trainer.overwrite=true")
        return None

    def remove_partial(self) -> list[str]:
        """Delete temp folders left by a killed or failed save; returns what was removed."""
        removed = []
        for name in sorted(os.listdir(self.root)):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
                removed.append(name)
        if removed:
            log.info("removed unfinished checkpoint folder(s): %s", ", ".join(removed))
        return removed

    def resolve_resume(self, resume: str) -> Optional[str]:
        """The checkpoint ``trainer.resume`` asks for: ``auto`` (newest intact one, or None),
        ``never``, or an explicit path that must be complete and intact."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest_valid()
        path = os.path.abspath(resume)
        if not os.path.isdir(path):
            raise CheckpointError(f"trainer.resume={resume}: no such checkpoint folder")
        if not os.path.isfile(os.path.join(path, COMPLETE)):
            raise CheckpointError(f"trainer.resume={resume}: checkpoint is incomplete (no {COMPLETE} marker)")
        problem = check_manifest(path)
        if problem is not None:
            raise CheckpointError(f"trainer.resume={resume}: checkpoint is damaged: {problem}")
        return path

    def begin(self, step: int) -> str:
        """A fresh temp folder for checkpoint ``step`` (where the ranks write their shards)."""
        tmp = os.path.join(self.root, f".tmp-step_{step:08d}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        return tmp

    def _failed(self, step: int, tmp: str, exc: BaseException) -> CheckpointSaveError:
        shutil.rmtree(tmp, ignore_errors=True)
        last = self.latest()
        last_txt = f"the last complete checkpoint is {last}" if last else "there is no earlier checkpoint"
        if _is_disk_full(exc):
            why = f"no space left on device under {self.root}"
        else:
            why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        return CheckpointSaveError(f"checkpoint of step {step} not saved: {why}; its partial folder was removed "
                                   f"and {last_txt}")

    def stage(self, step: int, write_shards: Callable[[str], None], trainer_state: dict[str, Any]) -> Staged:
        """Write everything of checkpoint ``step`` but the marker: shards (``write_shards(tmp)``), the
        driver's state and RNG, the manifest. On any failure the temp folder is removed."""
        tmp = os.path.join(self.root, f".tmp-step_{step:08d}")
        try:
            tmp = self.begin(step)
            write_shards(tmp)
            self._write_driver_files(tmp, trainer_state)
        except Exception as exc:  # noqa: BLE001 - every failure leaves nothing behind
            raise self._failed(step, tmp, exc) from exc
        return Staged(step, tmp)

    def _write_driver_files(self, tmp: str, trainer_state: dict[str, Any]) -> None:
        _write_json(os.path.join(tmp, STATE_FILE), trainer_state)
        _save_driver_rng(tmp)
        write_manifest(tmp, self.with_hashes)

    def commit(self, tmp: "str | Staged", step: Optional[int] = None,
               trainer_state: Optional[dict[str, Any]] = None) -> str:
        """Mark the staged folder complete, rename it into place, prune. ``trainer_state`` given:
        write the driver's files first (a one-call save for callers that stage nothing)."""
        if isinstance(tmp, Staged):
            step, tmp = tmp.step, tmp.tmp
        assert step is not None
        try:
            if trainer_state is not None:
                self._write_driver_files(tmp, trainer_state)
            _write_json(os.path.join(tmp, COMPLETE), {"step": step, "time": time.time()})
            _fsync_dir(tmp)
            final = self.step_dir(step)
            if os.path.exists(final):  # a re-run of the same step after a resume
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
        except Exception as exc:  # noqa: BLE001
            raise self._failed(step, tmp, exc) from exc
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
    try:
        with open(state_file) as fh:
            state = json.load(fh)
    except ValueError as exc:
        raise CheckpointError(f"{state_file}: not valid JSON ({exc})") from None
    _load_driver_rng(path)
    return state
