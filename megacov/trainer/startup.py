"""The first seconds of a run: the run folder, library warnings, the banner.

* :func:`prepare_run_dir`: a fresh run (``trainer.resume=never``) in a folder that already holds a
  run's checkpoints or metrics refuses to start, unless ``trainer.overwrite=true`` -- otherwise the
  new run would prune the old run's checkpoints by step number, a later ``resume=auto`` would pick
  the old run's step, and ``metrics.jsonl`` would be lost.
* :func:`quiet_library_warnings`: megatron's "Apex / TransformerEngine not installed" notes and
  deprecation warnings are filtered through ``PYTHONWARNINGS``, which every process started from
  the driver (Ray workers of a local cluster, vLLM engines, spawned ranks) inherits, so they are
  never printed instead of being printed by every rank.
* :func:`banner`: one block at start naming version, run folder, resume point and the layout plan.
"""
from __future__ import annotations

import logging
import os
import shutil
import warnings
from typing import Any

from megacov.config import ConfigError

log = logging.getLogger("megacov.trainer")

#: Outputs of a run that a fresh run would clobber (and that ``trainer.overwrite=true`` removes).
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "hf", "hf_exports", "curves.png", "wandb_id.txt")

#: ``PYTHONWARNINGS`` entries (``action:message-prefix:category``) for the notes every rank would repeat.
QUIET_WARNINGS = (
    "ignore::DeprecationWarning",
    "ignore::FutureWarning",
    "ignore:Transformer Engine and Apex are not installed:UserWarning",
    "ignore:Apex is not installed:UserWarning",
    "ignore:full scope is deprecated:UserWarning",  # megatron's config default, not megacov's choice
    "ignore:When using async grad allreduce it is recommended:UserWarning",  # a CUDA tuning hint, every rank
)


def _holds_run(run_dir: str) -> list[str]:
    found = []
    ckpt = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(ckpt) and any(n.startswith("step_") for n in os.listdir(ckpt)):
        steps = sorted(n for n in os.listdir(ckpt) if n.startswith("step_"))
        found.append(f"checkpoints up to {steps[-1]}")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        found.append("metrics.jsonl")
    if os.path.isdir(os.path.join(run_dir, "hf")):
        found.append("an exported policy (hf/)")
    return found


def prepare_run_dir(run_dir: str, resume: str, overwrite: bool) -> None:
    """Refuse a fresh run over another run's outputs; with ``overwrite`` remove them first."""
    if overwrite and resume == "auto":
        raise ConfigError("trainer.overwrite=true needs trainer.resume=never (with resume=auto a requeued job "
                          "would delete its own checkpoints)")
    if resume == "auto":
        return
    inside = resume != "never" and os.path.abspath(resume).startswith(os.path.abspath(run_dir) + os.sep)
    if inside:
        return  # resuming from one of this folder's own checkpoints
    found = _holds_run(run_dir)
    if not found:
        return
    if not overwrite:
        raise ConfigError(f"{run_dir} already holds a run ({', '.join(found)}); continue it with "
                          f"trainer.resume=auto, start over with trainer.overwrite=true, or choose another "
                          f"trainer.name")
    for name in RUN_OUTPUTS:
        path = os.path.join(run_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    log.info("trainer.overwrite=true: removed the previous run's outputs in %s", run_dir)


def quiet_warnings_env() -> str:
    """``PYTHONWARNINGS`` with the known noise filtered, keeping what the user set."""
    present = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    return ",".join(present + [w for w in QUIET_WARNINGS if w not in present])


def quiet_library_warnings() -> None:
    """Filter the known noise here and in every process started from now on."""
    os.environ["PYTHONWARNINGS"] = quiet_warnings_env()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*", category=UserWarning)


def banner(cfg: Any, plan: Any, run_dir: str) -> None:
    """One block before anything slow starts: what runs where, and where its outputs go."""
    from megacov import __version__

    log.info("megacov %s | run folder %s | trainer.resume=%s | %d steps, %s loss, %s advantage, reward %s\n%s",
             __version__, run_dir, cfg.trainer.resume, cfg.trainer.total_steps, cfg.algorithm.policy_loss,
             cfg.algorithm.advantage, cfg.reward.name, plan.table())
