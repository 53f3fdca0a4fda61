"""The per-rank training worker: one instance per Megatron rank, hosted by a Ray ``WorkerGroup``.

It owns this rank's :class:`~megacov.parallel.layout.ParallelLayout`, the actor's model chunk wrapped
in megatron DDP with its optimizer and LR schedule, and the reference policy (same layout,
forward-only). The driver calls its methods on every rank at once (``group.execute``); each method is
collective over the job's process groups.

Batches arrive whole (one Ray object read by every rank) and each rank takes its own DP share. Old
log-probs are computed on exactly the micro-batches the first training epoch will see (same
mini-batch split, same DP shard, same micro-batch size), so on-policy the recomputed log-probs are
bit-identical to the old ones and the first ``ppo_kl`` is exactly 0.

Updates are skipped -- weights, optimizer moments and LR schedule untouched -- when the loss or any
gradient is not finite (megatron's fp32 optimizer would otherwise apply NaN), and the skip is reported.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from megacov.parallel.batch import ActorBatch
from megacov.rollout.sender import WeightSenderMixin
from megacov.trainer import sft_loss  # noqa: F401  (registers the warm-start loss in this process)


def _dtype_name(cfg: Any) -> str:
    return cfg.model.dtype


def _resolve(batch: Any) -> ActorBatch:
    """Batches are sent as one Ray object that every rank reads (the worker group passes arguments
    nested, so Ray does not resolve the reference for us)."""
    import ray

    return ray.get(batch) if isinstance(batch, ray.ObjectRef) else batch


class ActorWorker(WeightSenderMixin):
    """One Megatron rank of the actor (and of the reference policy when a KL term needs it)."""

    def __init__(self, cfg: Any, model_path: str, *, total_updates: int, with_reference: bool,
                 reference_path: Optional[str] = None, mcore_checkpoint: Optional[str] = None) -> None:
        """``reference_path`` None: the reference is the initial actor (``model_path`` and, when given,
        ``mcore_checkpoint``)."""
        from megacov.models import build_model
        from megacov.models.arch import torch_dtype
        from megacov.parallel.layout import ParallelLayout
        from megacov.parallel.optim import build_actor_optim

        self.cfg = cfg
        self._offload: Any = None
        p = cfg.parallel
        self.layout = ParallelLayout.initialize(p.tp, p.pp, ep=p.ep, backend=p.backend, seed=cfg.trainer.seed)
        from megacov.models.moe_metrics import router_overrides

        overrides: dict[str, Any] = router_overrides(cfg.model, model_path)
        if cfg.model.gradient_checkpointing:
            overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        if p.sequence_parallel and p.tp > 1 and torch.cuda.is_available():
            overrides["sequence_parallel"] = True
        dtype = _dtype_name(cfg)
        model, self.info = build_model(model_path, self.layout, dtype=dtype,
                                       vocab_divisible_by=cfg.model.vocab_divisible_by, **overrides)
        if mcore_checkpoint:
            from megacov.models import load_mcore_checkpoint

            load_mcore_checkpoint(model, mcore_checkpoint)
        self.router_load = None
        if self.info.arch.moe is not None:
            from megacov.models.moe_metrics import RouterLoad

            self.router_load = RouterLoad(model, self.info.arch.num_layers, self.info.arch.moe.num_experts)
        bf16 = torch_dtype(dtype) == torch.bfloat16
        self.optim = build_actor_optim([model], self.layout, cfg.optim, p, total_steps=total_updates, bf16=bf16)
        import threading

        from megacov.trainer.actor_ckpt import warm_writer

        self._ckpt_warm = threading.Thread(target=warm_writer, name="ckpt-writer-warmup", daemon=True)
        self._ckpt_warm.start()
        self.ref = None
        if with_reference:
            self.ref, _ = build_model(reference_path or model_path, self.layout, dtype=dtype,
                                      vocab_divisible_by=cfg.model.vocab_divisible_by)
            if mcore_checkpoint and reference_path is None:
                from megacov.models import load_mcore_checkpoint

                load_mcore_checkpoint(self.ref, mcore_checkpoint)
            self.ref.eval()
            for param in self.ref.parameters():
                param.requires_grad_(False)

    # -- helpers -----------------------------------------------------------------------------------

    @property
    def model(self) -> list[Any]:
        return self.optim.model

    def describe(self) -> str:
        return self.layout.describe()

    def _kernel_args(self) -> dict[str, Any]:
        return dict(temperature=self.cfg.rollout.temperature,
                    workspace_mib=self.cfg.parallel.logprob_workspace_mib,
                    real_vocab_size=self.info.vocab_size)

    def _returns(self) -> bool:
        """One rank per DP replica answers for its shard (the others computed the same)."""
        return self.layout.tp_rank == 0 and self.layout.pp_rank == 0

    def _my_parts(self, batch: ActorBatch, mini_batch_seqs: int) -> list[ActorBatch]:
        """This rank's DP share of every mini-batch, in order: contiguous, or token-balanced over the
        DP ranks when micro-batches are cut by tokens (``parallel.max_tokens_per_micro_batch``)."""
        minis = [batch.rows(s, s + mini_batch_seqs) for s in range(0, batch.batch_size, mini_batch_seqs)]
        if self.cfg.parallel.max_tokens_per_micro_batch is None:
            return [m.shard(self.layout.dp_rank, self.layout.dp) for m in minis]
        return [m.balanced_shard(self.layout.dp_rank, self.layout.dp) for m in minis]

    def _micro_args(self) -> dict[str, Any]:
        p = self.cfg.parallel
        return dict(micro_batch_size=p.micro_batch_size, max_tokens_per_micro_batch=p.max_tokens_per_micro_batch)

    # -- forward-only passes -------------------------------------------------------------------------

    def log_probs(self, batch: ActorBatch, mini_batch_seqs: int, which: str = "actor"
                  ) -> Optional[list[tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]]]:
        """Log-probs (and entropies, actor only) of this rank's share of every mini-batch, with the
        global sequence ids of its rows (the share need not be contiguous)."""
        from megacov.parallel.actor import compute_log_probs

        if which == "ref" and self.ref is None:
            raise RuntimeError("no reference model was built on this worker")
        self._resident()
        chunks = self.model if which == "actor" else [self.ref]
        batch = _resolve(batch)
        out = []
        for part in self._my_parts(batch, mini_batch_seqs):
            part = part.to(self.layout.device)
            lp, ent = compute_log_probs(chunks, self.layout, part, with_entropy=which == "actor",
                                        **self._micro_args(), **self._kernel_args())
            out.append((lp.cpu(), None if ent is None else ent.cpu(), part.global_seq_ids.cpu()))
        return out if self._returns() else None

    # -- training ------------------------------------------------------------------------------------

    def _grads_finite(self) -> bool:
        """Every gradient on every rank finite: one device-side reduction per grad buffer, one host
        sync and one all-reduce over the whole job."""
        flags = []
        for chunk in self.model:
            buffers = getattr(chunk, "buffers", None)
            if isinstance(buffers, list):  # megatron DDP: contiguous grad buffers
                grads = [b.grad_data for b in buffers + list(getattr(chunk, "expert_parallel_buffers", []))]
            else:
                grads = [p.grad for p in chunk.parameters() if p.grad is not None]
            flags += [torch.isfinite(g).all() for g in grads if g is not None and g.numel()]
        ok = torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=self.layout.device)
        bad = (~ok).float().reshape(1).to(self.layout.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad.item() == 0)

    def update(self, batch: ActorBatch, mini_batch_seqs: int, *, step: int, controls: Any = None,
               algo_cfg: Any = None, epochs: Optional[int] = None) -> list[dict[str, Any]]:
        """All optimiser steps of one RL step: ``epochs`` passes over the mini-batches of ``batch``.

        Returns one metrics dict per optimiser step (identical on every rank).
        """
        from megacov.parallel.actor import train_step

        self._resident()
        hp = algo_cfg if algo_cfg is not None else self.cfg.algorithm
        batch = _resolve(batch)
        results = []
        for chunk in self.model:
            chunk.train()
        if self.router_load is not None:
            self.router_load.reset()
        for epoch in range(epochs or self.cfg.algorithm.ppo_epochs):
            for j, part in enumerate(self._my_parts(batch, mini_batch_seqs)):
                part = part.to(self.layout.device)
                # Before the first optimiser step the old log-probs ARE the current ones (computed on
                # these very micro-batches): the global selection needs no pre-pass forward.
                current = part.old_log_prob if epoch == 0 and j == 0 else None
                metrics = train_step(self.model, self.layout, part, algo_cfg=hp, step=step,
                                     **self._micro_args(), pack=self.cfg.parallel.pack_sequences,
                                     zero_grad_fn=self.optim.zero_grad, controls=controls,
                                     max_len=self.cfg.rollout.max_response_len, current_log_prob=current,
                                     epoch=epoch, **self._kernel_args())
                finite_loss = all(torch.isfinite(torch.tensor(float(v))) for k, v in metrics.items()
                                  if isinstance(v, (int, float)) and ("loss" in k or k == "entropy"))
                if finite_loss and (self.optim.checks_overflow or self._grads_finite()):
                    applied, grad_norm = self.optim.step()
                else:
                    self.optim.zero_grad()
                    applied, grad_norm = False, None
                metrics.update(applied=float(applied), grad_norm=float("nan") if grad_norm is None else grad_norm,
                               lr=self.optim.lr)
                if self.router_load is not None:
                    metrics.update(self.router_load.collect(self.layout))
                results.append(metrics)
        return results

    # -- weights out -----------------------------------------------------------------------------------

    def weight_source(self) -> Any:
        """This stage's weights in HF names, for the weight-transfer engine (see :mod:`megacov.rollout.sync`)."""
        from megacov.rollout.source import MegatronSource

        self._resident()
        return MegatronSource(self.model[0], self.layout, self.info)

    def built(self) -> dict[str, Any]:
        """What this rank holds: the runtime's accounting (a skipped reference is never built)."""
        return {"actor": True, "reference": self.ref is not None}

    def export_hf_shard(self, out_dir: str) -> Optional[dict[str, str]]:
        """Write this stage's HF tensors to ``model-<stage>-of-<pp>.safetensors`` (TP rank 0 of DP
        replica 0 writes; every TP rank takes part in the gathers). Returns ``{tensor: file}``."""
        from safetensors.torch import save_file

        from megacov.models import iter_hf_weights

        self._resident()
        tensors = {n: t.detach().to("cpu").contiguous().clone()
                   for n, t in iter_hf_weights(self.model[0], self.layout, self.info)}
        if self.layout.dp_rank != 0 or not tensors:
            return None
        name = f"model-{self.layout.pp_rank + 1:05d}-of-{self.layout.pp:05d}.safetensors"
        save_file(tensors, os.path.join(out_dir, name), metadata={"format": "pt"})
        return {t: name for t in tensors}

    def state_fingerprint(self) -> float:
        """Sum of every parameter of this rank in float64 (tests compare weights across runs)."""
        self._resident()
        return float(sum(p.detach().double().sum() for c in self.model for p in c.parameters()))

    # -- checkpoints -----------------------------------------------------------------------------------

    def save_checkpoint(self, ckpt_dir: str, with_optimizer: bool) -> None:
        from megacov.trainer.actor_ckpt import save_actor

        self._ckpt_warm.join()
        self._resident()
        save_actor(self, ckpt_dir, with_optimizer)

    def load_checkpoint(self, ckpt_dir: str) -> None:
        from megacov.trainer.actor_ckpt import load_actor

        self._resident()
        load_actor(self, ckpt_dir)

    # -- colocated offload (megacov.parallel.offload) --------------------------------------------------

    def offload(self) -> int:
        """Actor parameters, gradients and optimizer states, and the reference model, to host memory
        while the engines generate; returns the bytes freed. Every method above that needs them
        brings them back first."""
        if self._offload is None:
            from megacov.parallel.offload import TrainStateOffload

            self._offload = TrainStateOffload([*self.model, self.ref], [self.optim.optimizer])
        return self._offload.offload()

    def reload(self) -> int:
        """Back on the device (a no-op when resident); returns the bytes moved."""
        return self._offload.reload() if self._offload is not None else 0

    def _resident(self) -> None:
        self.reload()

    def close(self) -> None:
        self.close_weight_transfer()
        self.layout.destroy()
