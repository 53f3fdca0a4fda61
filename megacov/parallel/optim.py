"""Megatron DDP, optimizer and LR schedule for the actor, built from megacov's config.

The actor trains with megatron-core's own machinery: ``DistributedDataParallel`` (contiguous grad
buffers, gradient all-reduce / reduce-scatter over DP), ``get_megatron_optimizer`` (the distributed
optimizer when DP > 1 and enabled; fused Adam from TransformerEngine/apex when present, torch AdamW
otherwise) and ``OptimizerParamScheduler``. Nothing here reads global state: the layout supplies the
process groups.

Gradient scaling convention: megatron DDP *averages* gradients over DP ranks
(``average_in_collective``-free path: it divides by the DP size before the all-reduce). Losses handed
to the schedule must therefore be "this rank's share of the global loss, times dp", which the actor
step in :mod:`megacov.parallel.actor` accounts for via :func:`dp_loss_scale`.

Precision follows the parameters the model was built with: bf16 and fp16 params train through
megatron's mixed-precision optimizer (fp32 main weights and moments). fp16 also needs a loss scale,
or small gradients vanish: megatron's grad scaler (dynamic from 2**16, or ``optim.loss_scale``) is
installed as the model config's ``grad_scale_func``, which megatron's schedules apply to the loss
before backward; the optimizer unscales, and skips the step when the scaled gradients overflowed
(:attr:`ActorOptim.checks_overflow`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from megacov.config.schema import OptimConfig, ParallelConfig
from megacov.parallel.layout import ParallelLayout


@dataclass
class ActorOptim:
    """The wrapped model chunks, their optimizer and LR schedule (what a checkpoint must save)."""

    model: list[Any]
    optimizer: Any
    scheduler: Any

    def zero_grad(self) -> None:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self) -> tuple[bool, Optional[float]]:
        """Apply the accumulated gradients. Returns (applied, grad_norm).

        megatron's fp32 optimizer applies non-finite gradients as they are (only its mixed-precision
        optimizers skip them), so callers that must not corrupt the weights check the gradients first
        (the trainer's actor worker does, and reports the skipped step)."""
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads(self.model, pg_collection=self._pgs())
        applied, grad_norm, _ = self.optimizer.step()
        if applied:
            self.scheduler.step(increment=1)
        return bool(applied), (None if grad_norm is None else float(grad_norm))

    @property
    def checks_overflow(self) -> bool:
        """True when the optimizer itself detects non-finite (loss-scaled) gradients and skips the step
        (fp16): callers must then step it anyway, so that the dynamic loss scale can back off."""
        return bool(grad_scalers(self.optimizer))

    @property
    def loss_scale(self) -> Optional[float]:
        """The current fp16 loss scale (None without loss scaling)."""
        scalers = grad_scalers(self.optimizer)
        return float(scalers[0].scale) if scalers else None

    def _pgs(self) -> Any:
        return getattr(self.model[0], "_megacov_pg_collection", None)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def grad_scalers(optimizer: Any) -> list[Any]:
    """The loss scalers of a megatron optimizer (chained or not); empty without loss scaling."""
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [p.grad_scaler for p in parts if getattr(p, "grad_scaler", None) is not None]


FP16_INITIAL_LOSS_SCALE = 2.0 ** 16
"""Start of megatron's dynamic fp16 loss scale (it halves on overflow, doubles after a quiet window)."""


def _params_dtype(model_chunks: list[torch.nn.Module]) -> torch.dtype:
    dtypes = {p.dtype for c in model_chunks for p in c.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        raise ValueError(f"the model's parameters mix dtypes {sorted(map(str, dtypes))}")
    return dtypes.pop()


def dp_loss_scale(layout: ParallelLayout) -> float:
    """Factor that turns a rank's share of the global loss into what megatron DDP expects (it averages
    gradients over DP, we want their sum)."""
    return float(layout.dp)


def wrap_ddp(model_chunks: list[torch.nn.Module], layout: ParallelLayout, pcfg: ParallelConfig) -> list[Any]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    use_dist_opt = pcfg.use_distributed_optimizer and layout.dp > 1
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=use_dist_opt,
        check_for_nan_in_grad=False, bucket_size=None,
    )
    wrapped = []
    for i, chunk in enumerate(model_chunks):
        ddp = DistributedDataParallel(config=chunk.config, ddp_config=ddp_cfg, module=chunk,
                                      disable_bucketing=i > 0, pg_collection=layout.pg_collection)
        ddp._megacov_pg_collection = layout.pg_collection
        wrapped.append(ddp)
    return wrapped


def build_actor_optim(
    model_chunks: list[torch.nn.Module],
    layout: ParallelLayout,
    ocfg: OptimConfig,
    pcfg: ParallelConfig,
    *,
    total_steps: int,
    bf16: bool = False,
) -> ActorOptim:
    """Wrap ``model_chunks`` in megatron DDP and build optimizer + scheduler for ``total_steps``.

    The precision is that of the chunks' parameters (``bf16`` is accepted for callers that state it;
    it must agree)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    params_dtype = _params_dtype(model_chunks)
    if bf16 and params_dtype != torch.bfloat16:
        raise ValueError(f"bf16=True but the model's parameters are {params_dtype}")
    fp16 = params_dtype == torch.float16
    model = wrap_ddp(model_chunks, layout, pcfg)
    scale: dict[str, Any] = {}
    if fp16:
        scale = dict(loss_scale=ocfg.loss_scale, initial_loss_scale=FP16_INITIAL_LOSS_SCALE)
    elif ocfg.loss_scale is not None:
        raise ValueError(f"optim.loss_scale={ocfg.loss_scale} is for model.dtype=fp16 only "
                         f"(the model trains in {str(params_dtype).replace('torch.', '')})")
    opt_cfg = OptimizerConfig(
        optimizer="adam", lr=ocfg.lr, min_lr=ocfg.min_lr, weight_decay=ocfg.weight_decay,
        adam_beta1=ocfg.adam_beta1, adam_beta2=ocfg.adam_beta2, adam_eps=ocfg.adam_eps,
        clip_grad=ocfg.clip_grad, bf16=params_dtype == torch.bfloat16, fp16=fp16, params_dtype=params_dtype,
        use_distributed_optimizer=pcfg.use_distributed_optimizer and layout.dp > 1, **scale,
    )
    optimizer = get_megatron_optimizer(opt_cfg, model, use_gloo_process_groups=False,
                                       pg_collection=layout.pg_collection)
    if fp16:
        if not grad_scalers(optimizer):
            raise RuntimeError("megatron built an fp16 optimizer without a grad scaler")
        for chunk in model:  # megatron's schedules multiply the loss by it before backward
            chunk.config.grad_scale_func = optimizer.scale_loss
    decay_steps = max(1, total_steps)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if ocfg.lr_warmup_steps else ocfg.lr, max_lr=ocfg.lr, min_lr=ocfg.min_lr,
        lr_warmup_steps=ocfg.lr_warmup_steps, lr_decay_steps=decay_steps,
        lr_decay_style=ocfg.lr_decay_style, start_wd=ocfg.weight_decay, end_wd=ocfg.weight_decay,
        wd_incr_steps=decay_steps, wd_incr_style="constant",
    )
    return ActorOptim(model=model, optimizer=optimizer, scheduler=scheduler)
