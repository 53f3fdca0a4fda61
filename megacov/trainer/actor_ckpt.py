"""Actor checkpoints: model + optimizer + LR schedule through megatron ``dist_checkpointing``, plus
each rank's RNG states.

The model tensors are saved under their global megatron names, so the ``actor/`` folder is also a
plain mcore checkpoint that :func:`megacov.models.load_mcore_checkpoint` (and ``model.mcore_checkpoint``)
can initialise a model from at another TP x PP. The distributed optimizer's state uses the
``dp_reshardable`` format: fully parallel on save and load, resumable at another DP size.
"""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
OPTIM_MARKER = "optimizer.saved"


def warm_writer() -> None:
    """Start dist_checkpointing's result-queue manager process now (it is spawned on the first save
    and re-imports the worker's main module: seconds). Run in a background thread at start-up so the
    first checkpoint does not pay for it."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        filesystem_async._get_write_results_queue()
    except Exception:  # noqa: BLE001 - only an optimisation; the save creates it otherwise
        pass


def _rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _sharded(worker: Any, with_optimizer: bool, is_loading: bool) -> dict[str, Any]:
    from megacov.models.loader import unwrap

    model_sd = unwrap(worker.model[0]).sharded_state_dict()
    state: dict[str, Any] = {"model": model_sd}
    if with_optimizer:
        state["optimizer"] = worker.optim.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                                       metadata=OPTIM_METADATA)
        state["scheduler"] = worker.optim.scheduler.state_dict()
    return state


def save_actor(worker: Any, ckpt_dir: str, with_optimizer: bool) -> None:
    """Collective: every rank writes its shards into ``<ckpt_dir>/actor`` and its RNG file."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    actor_dir = os.path.join(ckpt_dir, "actor")
    rng_dir = os.path.join(ckpt_dir, "rng")
    if dist.get_rank() == 0:
        os.makedirs(actor_dir, exist_ok=True)
        os.makedirs(rng_dir, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_sharded(worker, with_optimizer, is_loading=False), actor_dir)
    torch.save(_rng_state(), os.path.join(rng_dir, f"rank_{dist.get_rank():05d}.pt"))
    if with_optimizer and dist.get_rank() == 0:
        open(os.path.join(ckpt_dir, OPTIM_MARKER), "w").close()
    dist.barrier()


def load_actor(worker: Any, ckpt_dir: str) -> None:
    """Collective: restore model, optimizer (when saved), LR schedule and this rank's RNG states."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megacov.models.loader import unwrap

    actor_dir = os.path.join(ckpt_dir, "actor")
    has_optim = os.path.isfile(os.path.join(ckpt_dir, OPTIM_MARKER))
    state = dist_checkpointing.load(_sharded(worker, has_optim, is_loading=True), actor_dir)
    unwrap(worker.model[0]).load_state_dict(state["model"], strict=True)
    if has_optim:
        worker.optim.optimizer.load_state_dict(state["optimizer"])
        worker.optim.scheduler.load_state_dict(state["scheduler"])
    rng_file = os.path.join(ckpt_dir, "rng", f"rank_{dist.get_rank():05d}.pt")
    if os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
