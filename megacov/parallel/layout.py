"""``ParallelLayout``: the one object that knows the process groups of a training process.

It is built once at start-up (:meth:`ParallelLayout.initialize`) and handed to whoever needs a
group: the vocab-parallel kernels get ``layout.tp_group``, the global selection gets
``layout.dp_group``, the weight exporter gets ``layout.pp_group`` ... Only this module (and the
model builder that passes ``layout.pg_collection`` into megatron) touches megatron's global
``parallel_state``; everything else receives groups explicitly, so code can be unit-tested with any
group and never depends on hidden global state.

Megatron orders ranks ``tp-cp-ep-dp-pp``: TP ranks are adjacent, then DP, then PP. The global rank is
``pp_rank * (dp * tp) + dp_rank * tp + tp_rank``.

Expert parallelism (``ep``) is carved out of data parallelism, as in megatron: the experts of a MoE
layer are split over ``ep`` consecutive DP ranks, which see different tokens for the dense layers
and exchange tokens for the experts. So ``ep`` must divide ``dp``. Expert layers keep megatron's
default expert-tensor-parallel size (= ``tp``), so an expert's TP shards live on the same ranks, in
the same group, as every other TP shard.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist


class LayoutError(ValueError):
    """The requested TP x PP (x EP) does not fit the world size."""


def check_ep(world: int, tp: int, pp: int, ep: int) -> None:
    """Refuse an expert-parallel size megatron cannot build (EP splits the DP ranks)."""
    if ep < 1:
        raise LayoutError(f"expert-parallel size {ep} must be >= 1")
    dp = world // (tp * pp)
    if dp % ep:
        raise LayoutError(f"expert-parallel size {ep} does not divide the data-parallel size {dp} "
                          f"(world {world} / (tp {tp} * pp {pp})); experts are split over DP ranks")


@dataclass
class ParallelLayout:
    tp: int
    pp: int
    dp: int
    rank: int
    world_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: Any = field(repr=False)
    pp_group: Any = field(repr=False)
    dp_group: Any = field(repr=False)
    mp_group: Any = field(repr=False)
    """Model-parallel group (TP x PP of one replica)."""
    pg_collection: Any = field(repr=False)
    """megatron-core ``ProcessGroupCollection`` handed to ``GPTModel`` and the optimizer."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cpu_compat: bool = False
    """True when :mod:`megacov.parallel.cpu_compat` is active for this process."""
    ep: int = 1
    """Expert-parallel size (divides ``dp``)."""
    ep_rank: int = 0
    ep_group: Any = field(default=None, repr=False)
    """The ranks that hold the different experts of one MoE layer (megatron's expert-model-parallel group)."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_dp_leader(self) -> bool:
        """One process per DP replica-set position whose outputs are authoritative for logging."""
        return self.tp_rank == 0 and self.is_last_stage

    @classmethod
    def initialize(
        cls,
        tp: int = 1,
        pp: int = 1,
        *,
        ep: int = 1,
        backend: str = "auto",
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        init_method: Optional[str] = None,
        timeout_s: float = 600.0,
    ) -> "ParallelLayout":
        """Initialise torch.distributed (if needed), megatron's parallel state and its RNG.

        Rank, world size and rendezvous come from the arguments or the usual ``RANK`` /
        ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` environment variables.
        """
        from megatron.core import parallel_state as ps
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        from megacov.parallel import cpu_compat

        use_cuda = torch.cuda.is_available()
        if backend == "auto":
            backend = "nccl" if use_cuda else "gloo"
        if not dist.is_initialized():
            rank = int(os.environ.get("RANK", 0)) if rank is None else rank
            world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
            if use_cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
            dist.init_process_group(backend, rank=rank, world_size=world_size, init_method=init_method,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        world = dist.get_world_size()
        if world % (tp * pp) != 0:
            raise LayoutError(f"world size {world} is not a multiple of tp*pp = {tp}*{pp}")
        check_ep(world, tp, pp, ep)
        compat = cpu_compat.enable() if not use_cuda else False
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     expert_model_parallel_size=ep, create_gloo_process_groups=not use_cuda)
        model_parallel_cuda_manual_seed(seed)
        torch.manual_seed(seed)
        pgs = ProcessGroupCollection.use_mpu_process_groups()
        return cls(
            tp=tp, pp=pp, dp=world // (tp * pp), rank=dist.get_rank(), world_size=world,
            tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
            dp_rank=ps.get_data_parallel_rank(), tp_group=ps.get_tensor_model_parallel_group(),
            pp_group=ps.get_pipeline_model_parallel_group(), dp_group=ps.get_data_parallel_group(),
            mp_group=ps.get_model_parallel_group(), pg_collection=pgs,
            device=torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu"),
            cpu_compat=compat, ep=ep, ep_rank=ps.get_expert_model_parallel_rank(),
            ep_group=ps.get_expert_model_parallel_group(),
        )

    def destroy(self) -> None:
        """Tear down megatron's parallel state, the process group and the CPU layer."""
        from megatron.core import parallel_state as ps

        from megacov.parallel import cpu_compat

        ps.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.cpu_compat:
            cpu_compat.disable()

    def describe(self) -> str:
        ep = f" ep {self.ep_rank}/{self.ep}" if self.ep > 1 else ""
        return (f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp} "
                f"pp {self.pp_rank}/{self.pp} dp {self.dp_rank}/{self.dp}{ep}")
