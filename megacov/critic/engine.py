"""One data-parallel rank of the critic: a :class:`~megacov.critic.model.ValueModel` in a DeepSpeed
ZeRO engine, with the PPO value loss.

Layout independence. A mini-batch of M sequences is split into ``dp`` contiguous row blocks, each
processed in micro-batches of ``critic.micro_batch_size``. Every micro-batch loss is the *sum* of
its token losses divided by the mini-batch's global token count, times ``dp`` because DeepSpeed
averages gradients over the data-parallel ranks; the gradient-accumulation scaling of DeepSpeed is
switched off (``scale_wrt_gas=False``) since that normalisation is already exact. So the update is
the token mean over the mini-batch whatever ``dp`` and the micro-batch size are.

The optimizer is a plain ``torch.optim.AdamW`` handed to DeepSpeed as its client optimizer: ZeRO
shards its state over the ranks (stage 2 and 3, optionally kept in CPU memory) without any
JIT-compiled fused kernel, which is what makes the same code run on CPU over gloo.

Checkpoints are written by this module, not by ``engine.save_checkpoint``, because DeepSpeed reads
its own files back with ``torch.load(weights_only=False)`` (arbitrary unpickling): full weights as
safetensors (rank 0, gathered under ZeRO-3), each rank's optimizer partition (fp32 master slice and
AdamW moments) as safetensors, and the counters as JSON.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from megacov.algorithms.value import value_loss_sum
from megacov.critic.model import WEIGHTS_FILE, build_value_model, load_weights, torch_dtype, write_json

log = logging.getLogger(__name__)

STATE_FILE = "critic_state.json"


def optim_file(rank: int) -> str:
    return f"optim_rank{rank:05d}.safetensors"


@dataclass(frozen=True)
class CriticShape:
    """How one update is cut: sequences per optimizer step and per micro-batch, and the DP size."""

    seqs_per_update: int
    micro_batch_size: int
    dp: int

    @property
    def per_rank(self) -> int:
        return self.seqs_per_update // self.dp

    @property
    def grad_accum(self) -> int:
        return self.per_rank // self.micro_batch_size


def deepspeed_config(cfg: Any, shape: CriticShape, dtype: torch.dtype) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": int(cfg.zero_stage)}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": shape.micro_batch_size,
        "gradient_accumulation_steps": shape.grad_accum,
        "train_batch_size": shape.micro_batch_size * shape.grad_accum * shape.dp,
        "zero_optimization": zero,
        "gradient_clipping": float(cfg.clip_grad),
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # the torch AdamW also runs on offloaded state
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _no_shm_comm_op() -> None:
    """DeepSpeed's CPU accelerator JIT-builds a shared-memory all-reduce kernel when its comm layer
    starts; training uses torch.distributed (gloo) only, so mark that op unavailable instead of
    needing a C++ toolchain at run time."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class CriticEngine:
    """The critic on this process; ``torch.distributed`` must already be initialised (all ranks)."""

    def __init__(self, cfg: Any, init_path: str, shape: CriticShape, *, resume_dir: Optional[str] = None) -> None:
        import deepspeed

        if shape.per_rank * shape.dp != shape.seqs_per_update or shape.grad_accum * shape.micro_batch_size != shape.per_rank:
            raise ValueError(f"critic: {shape.seqs_per_update} sequences per update do not split into "
                             f"dp={shape.dp} x micro-batches of {shape.micro_batch_size}")
        if dist.get_world_size() != shape.dp:
            raise ValueError(f"critic: process group has {dist.get_world_size()} ranks, expected dp={shape.dp}")
        _no_shm_comm_op()
        self.cfg, self.shape = cfg, shape
        self.rank = dist.get_rank()
        self.dtype = torch_dtype(cfg.dtype)
        model = build_value_model(init_path, dtype=self.dtype, seed=cfg.seed)
        self.updates = 0
        if resume_dir is not None:
            load_weights(model, resume_dir)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      foreach=False)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               config=deepspeed_config(cfg, shape, self.dtype),
                                               dist_init_required=False)
        self.device = self.engine.device
        if resume_dir is not None:
            self._load_optimizer(resume_dir)

    # -- forward -----------------------------------------------------------------------------------

    def _rows(self, batch_size: int) -> tuple[range, int]:
        """This rank's contiguous block of rows and the micro-batch count every rank runs (equal on
        all ranks: under ZeRO-3 a forward is a collective)."""
        chunk = math.ceil(batch_size / self.shape.dp)
        lo = min(self.rank * chunk, batch_size)
        return range(lo, min(lo + chunk, batch_size)), math.ceil(chunk / self.shape.micro_batch_size)

    def values(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """[rows of this rank, L] float32 values of this rank's block of the batch."""
        rows, n_micro = self._rows(input_ids.shape[0])
        mbs = self.shape.micro_batch_size
        out = []
        with torch.no_grad():
            for k in range(n_micro):
                idx = list(rows[k * mbs:(k + 1) * mbs])
                real = len(idx)
                idx = idx or [0]  # keep the collective count equal: a throw-away row
                v = self.engine(input_ids[idx].to(self.device), position_ids[idx].to(self.device))
                if real:
                    out.append(v.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, input_ids.shape[1])

    # -- update ------------------------------------------------------------------------------------

    def _lr(self) -> float:
        w = int(self.cfg.lr_warmup_steps)
        return float(self.cfg.lr) * (min(1.0, (self.updates + 1) / w) if w > 0 else 1.0)

    def update(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
               returns: torch.Tensor, old_values: torch.Tensor, *, epochs: int = 1) -> dict[str, float]:
        """``epochs`` passes over the batch, one optimizer step per mini-batch of
        ``shape.seqs_per_update`` rows (in row order, as the actor's passes); the value clip stays
        anchored at ``old_values`` in every pass. Returns the metrics of all passes (identical on
        every rank): token-mean value loss and clip fraction, mean grad norm, optimizer steps."""
        m_seqs = self.shape.seqs_per_update
        b = input_ids.shape[0]
        if b % m_seqs:
            raise ValueError(f"critic: batch of {b} rows is not a multiple of {m_seqs} sequences per update")
        if epochs < 1:
            raise ValueError(f"critic: epochs={epochs} must be >= 1")
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, clipped tokens, tokens
        grad_norms: list[float] = []
        lr = self._lr()
        for _ in range(epochs):
            for start in range(0, b, m_seqs):
                lr = self._lr()
                totals += self._step(input_ids, position_ids, mask, returns, old_values, start, lr)
                gn = self.engine.get_global_grad_norm()
                grad_norms.append(float(gn) if gn is not None else float("nan"))
        dist.all_reduce(totals)
        n = max(float(totals[2]), 1.0)
        return {"critic/value_loss": float(totals[0]) / n, "critic/vf_clipfrac": float(totals[1]) / n,
                "critic/grad_norm": sum(grad_norms) / max(len(grad_norms), 1), "critic/lr": lr,
                "critic/updates": float(len(grad_norms))}

    def _step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
              returns: torch.Tensor, old_values: torch.Tensor, start: int, lr: float) -> torch.Tensor:
        """One optimizer step on the mini-batch of rows ``start ..``; this rank's [loss sum, clipped
        tokens, tokens] (float64)."""
        m_seqs, mbs = self.shape.seqs_per_update, self.shape.micro_batch_size
        totals = torch.zeros(3, dtype=torch.float64)
        n_tokens = float(mask[start:start + m_seqs].sum())
        lo = start + self.rank * self.shape.per_rank
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr
        for k in range(self.shape.grad_accum):
            sl = slice(lo + k * mbs, lo + (k + 1) * mbs)
            v = self.engine(input_ids[sl].to(self.device), position_ids[sl].to(self.device))
            loss_sum, m = value_loss_sum(v, old_values[sl].to(v), returns[sl].to(v), mask[sl].to(self.device),
                                         self.cfg.value_clip)
            self.engine.backward(loss_sum * self._loss_scale(n_tokens, m["tokens"]), scale_wrt_gas=False)
            self.engine.step()
            totals += torch.tensor([float(loss_sum.detach()), float(m["clipped"]), float(m["tokens"])],
                                   dtype=torch.float64)
        self.updates += 1
        return totals

    def _loss_scale(self, mini_batch_tokens: float, micro_tokens: torch.Tensor) -> float:
        """Factor of a micro-batch's loss sum: 1 / (the mini-batch's tokens), times DP because
        DeepSpeed averages gradients over the ranks."""
        del micro_tokens
        return self.shape.dp / mini_batch_tokens if mini_batch_tokens > 0 else 0.0

    # -- checkpoints -------------------------------------------------------------------------------

    def _base_optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer.optimizer  # the torch AdamW that ZeRO drives over its partitions

    def _master_partitions(self) -> list[torch.Tensor]:
        """This rank's fp32 master slices, one flat tensor per (sub-)group: the tensors the AdamW
        state is keyed by. ZeRO-3 swaps them into the AdamW param groups one sub-group at a time, so
        they are read from the ZeRO optimizer, not from ``param_groups``."""
        zero = self.engine.optimizer
        if int(self.cfg.zero_stage) == 3:
            return list(zero.fp32_partitioned_groups_flat)
        return list(zero.single_partition_of_fp32_groups)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight, whole, on every rank (gathered one parameter at a time under ZeRO-3)."""
        module = self.engine.module
        if int(self.cfg.zero_stage) != 3:
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        from deepspeed.runtime.zero import GatheredParameters

        out = {}
        for name, p in module.named_parameters():
            with GatheredParameters([p]):
                out[name] = p.detach().cpu().clone()
        for name, buf in module.named_buffers():
            if name in module.state_dict():
                out[name] = buf.detach().cpu().clone()
        return out

    def save(self, out_dir: str) -> None:
        """Weights (rank 0), this rank's optimizer partition and the counters into ``out_dir``."""
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        weights = self.full_state_dict()
        if self.rank == 0:
            save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(out_dir, WEIGHTS_FILE))
        opt = self._base_optimizer()
        tensors: dict[str, torch.Tensor] = {}
        for gi, p in enumerate(self._master_partitions()):
            tensors[f"g{gi}.master"] = p.detach().cpu().clone()
            for key, value in opt.state.get(p, {}).items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"g{gi}.{key}"] = t.detach().cpu().clone()
        save_file(tensors, os.path.join(out_dir, optim_file(self.rank)))
        if self.rank == 0:
            write_json(os.path.join(out_dir, STATE_FILE),
                       {"updates": self.updates, "dp": self.shape.dp, "zero_stage": int(self.cfg.zero_stage)})
        dist.barrier()

    def _load_optimizer(self, ckpt_dir: str) -> None:
        import json

        from safetensors.torch import load_file

        with open(os.path.join(ckpt_dir, STATE_FILE)) as fh:
            state = json.load(fh)
        if int(state["dp"]) != self.shape.dp or int(state["zero_stage"]) != int(self.cfg.zero_stage):
            raise ValueError(f"{ckpt_dir}: critic saved with critic.world_size={state['dp']} and "
                             f"zero_stage={state['zero_stage']}; resume with the same values")
        self.updates = int(state["updates"])
        tensors = load_file(os.path.join(ckpt_dir, optim_file(self.rank)))
        opt = self._base_optimizer()
        with torch.no_grad():
            for gi, p in enumerate(self._master_partitions()):
                prefix = f"g{gi}."
                p.copy_(tensors[prefix + "master"])
                opt.state[p] = {k[len(prefix):]: (v if k.endswith(".step") else v.to(p.device))
                                for k, v in tensors.items() if k.startswith(prefix) and not k.endswith(".master")}
