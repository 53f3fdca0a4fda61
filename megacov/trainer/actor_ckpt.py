"""Actor checkpoints: model + optimizer + LR schedule through megatron ``dist_checkpointing``, plus
each rank's RNG states.

The model tensors are saved under their global megatron names, so the ``actor/`` folder is also a
plain mcore checkpoint that :func:`megacov.models.load_mcore_checkpoint` (and ``model.mcore_checkpoint``)
can initialise a model from at another TP x PP. The distributed optimizer's state uses the
``dp_reshardable`` format: fully parallel on save and load, resumable at another DP size.

RNG states are safetensors with a JSON header, and the megatron load runs with
:func:`megacov.trainer.safe_load.install` in place: nothing in a checkpoint is unpickled without an
allow-list.
"""
from __future__ import annotations

import json
import logging
import os
import random
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

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


def _rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """This rank's generators as ``(json part, tensors)``: python and numpy as JSON, torch, CUDA and
    megatron's tracker states as tensors (saved with safetensors: nothing to unpickle on resume)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    js = {"python": [version, list(internal), gauss],
          "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch": torch.get_rng_state()}
    for key, state in get_cuda_rng_tracker().get_states().items():
        tensors[f"tracker/{key}"] = state
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return js, tensors


def write_rng_file(path: str, js: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"rng": json.dumps(js)})


def read_rng_file(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The states :func:`write_rng_file` stored (safetensors + JSON metadata; nothing is unpickled)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as fh:
        js = json.loads((fh.metadata() or {})["rng"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return js, tensors


def _set_rng_state(js: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    version, internal, gauss = js["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    name, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(tensors["torch"])
    tracker = {k[len("tracker/"):]: v for k, v in tensors.items() if k.startswith("tracker/")}
    get_cuda_rng_tracker().set_states(tracker)
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def _rng_path(ckpt_dir: str, rank: int) -> str:
    return os.path.join(ckpt_dir, "rng", f"rank_{rank:05d}.safetensors")


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
    write_rng_file(_rng_path(ckpt_dir, dist.get_rank()), *_rng_state())
    if with_optimizer and dist.get_rank() == 0:
        open(os.path.join(ckpt_dir, OPTIM_MARKER), "w").close()
    dist.barrier()


def load_actor(worker: Any, ckpt_dir: str) -> None:
    """Collective: restore model, optimizer (when saved), LR schedule and this rank's RNG states."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megacov.models.loader import unwrap
    from megacov.trainer import safe_load

    safe_load.install()  # megatron's loader would unpickle the checkpoint's metadata and objects freely
    actor_dir = os.path.join(ckpt_dir, "actor")
    has_optim = os.path.isfile(os.path.join(ckpt_dir, OPTIM_MARKER))
    state = dist_checkpointing.load(_sharded(worker, has_optim, is_loading=True), actor_dir)
    unwrap(worker.model[0]).load_state_dict(state["model"], strict=True)
    if has_optim:
        worker.optim.optimizer.load_state_dict(state["optimizer"])
        worker.optim.scheduler.load_state_dict(state["scheduler"])
    rng_file = _rng_path(ckpt_dir, dist.get_rank())
    if os.path.isfile(rng_file):
        _set_rng_state(*read_rng_file(rng_file))
    elif os.path.isfile(rng_file[: -len(".safetensors")] + ".pt"):
        log.warning("%s: this older checkpoint stores RNG states as a pickle, which megacov does not load "
                    "(it could run code); the RNG states are not restored", ckpt_dir)
