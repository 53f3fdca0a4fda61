"""The actor's passes through megatron-core's pipeline schedule: log-probs and one update.

:func:`compute_log_probs` is a forward-only pass over micro-batches (old / reference / pre-pass
log-probs); :func:`train_step` runs forward and backward of one optimiser mini-batch and leaves the
gradients in the model (the caller steps the optimizer).

How the gradients come out equal to the single-device gradient of the mini-batch loss:

* The loss of each micro-batch is its *share* of the global loss: the normaliser
  (:class:`~megacov.algorithms.losses.LossNormalizer`) counts the whole mini-batch over all DP
  ranks, so the shares of all micro-batches on all ranks add up to the mini-batch loss.
* megatron's schedule divides a ``(loss, metrics)`` loss by the number of micro-batches, so the
  loss function hands it ``share * num_microbatches``.
* Over DP, megatron's ``DistributedDataParallel`` *averages* gradients; the share is then also
  multiplied by the DP size. Raw (unwrapped) modules get their gradients *summed* over DP here.

Every token choice of the step (the policy loss's registered rule -- Clip-Cov, KL-Cov, ... -- and
the high-entropy tokens of ``algorithm.entropy_top_ratio``) is made before the training pass, from
the whole mini-batch (see :mod:`megacov.parallel.selection` and ``algorithm.cov_scope``), and
every micro-batch's loss uses its slice of that choice.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megacov.algorithms import selection as sel
from megacov.algorithms.losses import METRIC_REDUCTIONS, LossNormalizer, loss_selection
from megacov.algorithms.objective import actor_loss
from megacov.parallel.batch import ActorBatch
from megacov.parallel.layout import ParallelLayout
from megacov.parallel.packing import per_sequence_rotary
from megacov.parallel.selection import (
    GlobalSelection,
    global_normalizer,
    global_scope_stats,
    select_global,
    step_rules,
)
from megacov.parallel.vocab_parallel import (
    DEFAULT_WORKSPACE_MIB,
    compute_dtype,
    group_size_rank,
    token_logprob_entropy,
)

COV_SCOPES = ("global", "global_old", "micro_batch")


def _chunks(model_chunks: Any) -> list[torch.nn.Module]:
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    if len(chunks) != 1:
        raise NotImplementedError("virtual pipeline stages (several model chunks per rank) are not "
                                  "supported; pass the single model chunk of this rank")
    return chunks


def _model_config(chunk: torch.nn.Module) -> Any:
    from megatron.core.utils import get_model_config

    return get_model_config(chunk)


def _schedule(layout: ParallelLayout) -> Callable[..., Any]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func(pp_size=layout.pp, vp_size=None)


@contextlib.contextmanager
def _eval_mode(chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    modes = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        yield
    finally:
        for c, mode in zip(chunks, modes):
            c.train(mode)


def _last_stage_src(layout: ParallelLayout) -> int:
    return dist.get_global_rank(layout.pp_group, layout.pp - 1) if layout.pp > 1 else layout.rank


def _broadcast_from_last_stage(t: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """Last stage -> every stage, then TP rank 0 -> its TP group: identical on the whole
    model-parallel group by construction, not by the bitwise determinism of the collectives."""
    if layout.pp > 1:
        dist.broadcast(t, src=_last_stage_src(layout), group=layout.pp_group)
    if layout.tp > 1:
        dist.broadcast(t, src=dist.get_global_rank(layout.tp_group, 0), group=layout.tp_group)
    return t


def _broadcast_object_from_last_stage(obj: Any, layout: ParallelLayout) -> Any:
    device = layout.device if layout.device.type == "cuda" else None
    box = [obj]
    if layout.pp > 1:
        dist.broadcast_object_list(box, src=_last_stage_src(layout), group=layout.pp_group, device=device)
    if layout.tp > 1:
        dist.broadcast_object_list(box, src=dist.get_global_rank(layout.tp_group, 0), group=layout.tp_group,
                                   device=device)
    return box[0]


def _run_schedule(chunks: list[torch.nn.Module], layout: ParallelLayout, micro: list[ActorBatch],
                  forward_step: Callable[..., Any], forward_only: bool, data: Sequence[Any] | None = None,
                  shape: tuple[int, int] | None = None) -> list:
    """``data`` (default ``micro``) feeds ``forward_step``; ``shape`` (rows, columns) is what one
    micro-batch sends between pipeline stages (default: that of ``micro[0]``)."""
    kwargs: dict[str, Any] = {"pg_collection": layout.pg_collection}
    if layout.pp > 1:  # the pipelined schedules take the groups only together with a communicator
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        kwargs["p2p_communicator"] = P2PCommunicator(pp_group=layout.pp_group,
                                                     config=_model_config(chunks[0]))
    rows, cols = shape or (micro[0].batch_size, micro[0].seq_len)
    return _schedule(layout)(
        forward_step_func=forward_step, data_iterator=iter(micro if data is None else data), model=chunks,
        num_microbatches=len(micro), seq_length=cols,
        micro_batch_size=rows, forward_only=forward_only,
        collect_non_loss_data=forward_only, **kwargs)


def _micro_batches(batch: ActorBatch, layout: ParallelLayout, micro_batch_size: int,
                   max_tokens: int | None) -> list[ActorBatch]:
    """``micro_batch_size`` sequences at a time, or token-budget micro-batches when ``max_tokens``
    is set; padded to one shape under a pipeline schedule."""
    if max_tokens is None:
        return batch.micro_batches(micro_batch_size, pad_last=layout.pp > 1)
    return batch.token_budget_micro_batches(max_tokens, pad_rows=layout.pp > 1)


def _forward(model: torch.nn.Module, mb: ActorBatch, row: Any) -> tuple[Any, Any]:
    """The model's output on micro-batch ``mb``, run as the packed ``row`` when one is given; and
    the batch whose token ids the output's columns follow."""
    feed, mask = (mb, None) if row is None else (row, row.attention_mask)
    with per_sequence_rotary(model, row):
        return model(feed.input_ids, feed.position_ids, attention_mask=mask), feed


def compute_log_probs(model_chunks: Any, layout: ParallelLayout, batch: ActorBatch, *,
                      temperature: float, real_vocab_size: int,
                      workspace_mib: float = DEFAULT_WORKSPACE_MIB, chunk_size: int | None = None,
                      with_entropy: bool = True, micro_batch_size: int | None = None,
                      max_tokens_per_micro_batch: int | None = None, pack: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward-only log-probs (and entropies) of this DP rank's ``batch``: two [B, L] tensors.

    Runs in eval mode without autograd, ``micro_batch_size`` sequences at a time (default: the
    whole batch at once; ``max_tokens_per_micro_batch`` cuts by tokens instead). The results are computed on the last pipeline stage and broadcast, so
    every rank of the model-parallel group returns the same tensors; column 0 is 0. ``entropy``
    is None when ``with_entropy`` is False (that pass is then skipped). ``pack`` runs each
    micro-batch as one row without padding; it computes a row's columns only up to its last
    trained target (:attr:`ActorBatch.token_counts`), the rest are 0.
    """
    chunks = _chunks(model_chunks)
    mbs = micro_batch_size or batch.batch_size
    micro = _micro_batches(batch, layout, mbs, max_tokens_per_micro_batch)
    rows = _packed_rows(micro, layout) if pack else [None] * len(micro)

    def forward_step(data: Iterator[tuple[ActorBatch, Any]], model: torch.nn.Module) -> tuple[Any, Callable]:
        mb, row = next(data)
        output, feed = _forward(model, mb, row)

        def collect(logits: torch.Tensor, non_loss_data: bool = True) -> torch.Tensor:
            lp, ent = token_logprob_entropy(logits, feed.input_ids, tp_group=layout.tp_group,
                                            real_vocab_size=real_vocab_size, temperature=temperature,
                                            workspace_mib=workspace_mib, chunk_size=chunk_size,
                                            with_entropy=with_entropy)
            if row is not None:
                lp, ent = row.unpack(lp), row.unpack(ent)
            return torch.stack([lp, ent])

        return output, collect

    with torch.no_grad(), _eval_mode(chunks):
        store = _run_schedule(chunks, layout, micro, forward_step, forward_only=True, data=list(zip(micro, rows)),
                              shape=(1, rows[0].length) if pack else None)
    dtype = compute_dtype(_model_config(chunks[0]).params_dtype)
    out = torch.empty(2, batch.batch_size, batch.seq_len, dtype=dtype, device=layout.device)
    if layout.is_last_stage and max_tokens_per_micro_batch is None:
        out.copy_(torch.cat(list(store), dim=1)[:, :batch.batch_size])
    elif layout.is_last_stage:  # token-budget micro-batches reorder rows: put them back by global id
        where = {int(g): j for j, g in enumerate(torch.cat([mb.global_seq_ids for mb in micro]).tolist())
                 if g >= 0}
        rows = [i for i, g in enumerate(batch.global_seq_ids.tolist()) if g >= 0]
        done = torch.cat(list(store), dim=1)
        out.zero_()
        out[:, rows] = done[:, [where[int(batch.global_seq_ids[i])] for i in rows]]
    out = _broadcast_from_last_stage(out, layout)
    return out[0], (out[1] if with_entropy else None)


def _grad_averaged_over_dp(chunks: Sequence[torch.nn.Module]) -> bool:
    """True for megatron DDP modules (they average gradients over DP), False for raw modules."""
    from megatron.core.distributed import DistributedDataParallel

    wrapped = [isinstance(c, DistributedDataParallel) for c in chunks]
    if any(wrapped) and _model_config(chunks[0]).calculate_per_token_loss:
        raise ValueError("train_step normalises the loss itself; set calculate_per_token_loss=False "
                         "in the model config")
    return all(wrapped)


def _sum_grads_over_dp(chunks: Sequence[torch.nn.Module], layout: ParallelLayout) -> None:
    """DP sum of ``.grad`` for unwrapped modules (tests, tools). Only that: tied embeddings across
    pipeline stages and sequence-parallel norms need megatron DDP + ``finalize_model_grads``."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    # Expert-parallel experts (megatron marks them ``allreduce=False``) hold different experts on the
    # ranks of an EP group: their gradients are summed over the expert-data-parallel group only.
    expert_dp = getattr(layout.pg_collection, "expt_dp", None) if getattr(layout, "ep", 1) > 1 else None
    for expert in (False, True):
        group = expert_dp if expert else layout.dp_group
        if group is None or group_size_rank(group)[0] == 1:
            continue
        grads = [p.grad for c in chunks for p in c.parameters()
                 if p.grad is not None and (not getattr(p, "allreduce", True)) == expert]
        if not grads:
            continue
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


@dataclass(frozen=True)
class StepSelection:
    """Every global choice of one mini-batch: the scope statistics and one selection per rule."""

    stats: sel.ScopeStats
    by_rule: dict[str, GlobalSelection]
    prepass_forwards: int
    """Forward-only passes run to get current-policy inputs (0 or 1)."""

    def mask_for(self, rule: str | None, global_token_ids: torch.Tensor) -> torch.Tensor | None:
        """The micro-batch's mask of ``rule`` (None when the step does not apply that rule)."""
        if rule is None or rule not in self.by_rule:
            return None
        return self.by_rule[rule].mask_for(global_token_ids)


def _needs(rules: Sequence[str]) -> set[str]:
    return {u for r in rules for u in sel.get_selection_rule(r).uses}


def prepare_selection(model_chunks: Any, layout: ParallelLayout, batch: ActorBatch, *, algo_cfg: Any,
                      step: int, temperature: float, real_vocab_size: int, micro_batch_size: int,
                      workspace_mib: float = DEFAULT_WORKSPACE_MIB, chunk_size: int | None = None,
                      max_tokens_per_micro_batch: int | None = None,
                      current_log_prob: torch.Tensor | None = None,
                      current_entropy: torch.Tensor | None = None) -> StepSelection | None:
    """The global token choices of ``algo_cfg.cov_scope`` (None for ``micro_batch``).

    ``global`` runs one forward-only pre-pass with the current weights when a rule of the step
    reads current-policy inputs (log-probs, entropies) that the caller did not pass in
    ``current_log_prob`` / ``current_entropy``; ``global_old`` scores on ``old_log_prob``.
    """
    scope = algo_cfg.cov_scope
    if scope not in COV_SCOPES:
        raise ValueError(f"unknown algorithm.cov_scope '{scope}'; expected one of {', '.join(COV_SCOPES)}")
    if scope == "micro_batch":
        return None
    rules = step_rules(algo_cfg)
    needs = _needs(rules)
    log_prob, entropy, forwards = batch.old_log_prob, None, 0
    if scope == "global_old" and "entropy" in needs:
        raise ValueError("algorithm.entropy_top_ratio needs cov_scope global or micro_batch: the batch "
                         "carries no old-policy entropies")
    if scope == "global" and needs:
        log_prob, entropy = current_log_prob, current_entropy
        missing = ("log_prob" in needs and log_prob is None) or ("entropy" in needs and entropy is None)
        if missing:
            log_prob, entropy = compute_log_probs(model_chunks, layout, batch, temperature=temperature,
                                                  workspace_mib=workspace_mib, chunk_size=chunk_size,
                                                  real_vocab_size=real_vocab_size,
                                                  with_entropy="entropy" in needs,
                                                  micro_batch_size=micro_batch_size,
                                                  max_tokens_per_micro_batch=max_tokens_per_micro_batch)
            forwards = 1
        log_prob = log_prob if log_prob is not None else batch.old_log_prob
    stats = global_scope_stats(log_prob, batch.advantages, batch.mask, layout.dp_group)
    by_rule = {r: select_global(log_prob, batch.old_log_prob, batch.advantages, batch.mask,
                                batch.global_token_ids, hp=algo_cfg, step=step, dp_group=layout.dp_group,
                                stats=stats, entropy=entropy, rule=r) for r in rules}
    return StepSelection(stats=stats, by_rule=by_rule, prepass_forwards=forwards)


def _loss_metrics(metrics: dict[str, Any], mb: ActorBatch) -> dict[str, Any]:
    """Detached scalars of one micro-batch plus the global ids it selected."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if key.endswith("selected") and torch.is_tensor(value) and value.dim() > 0:
            out[f"{key}_ids"] = mb.global_token_ids[value.bool()].detach()
        elif METRIC_REDUCTIONS.get(key) != "local" and torch.is_tensor(value) and value.dim() == 0:
            out[key] = value.detach().to(torch.float64)
    return out


def train_step(model_chunks: Any, layout: ParallelLayout, batch: ActorBatch, *, algo_cfg: Any, step: int,
               temperature: float, real_vocab_size: int, micro_batch_size: int,
               workspace_mib: float = DEFAULT_WORKSPACE_MIB, chunk_size: int | None = None,
               zero_grad_fn: Callable[[], None] | None = None, controls: Any = None,
               max_len: int | None = None, current_log_prob: torch.Tensor | None = None,
               current_entropy: torch.Tensor | None = None,
               max_tokens_per_micro_batch: int | None = None, pack: bool = False,
               epoch: int = 0) -> dict[str, Any]:
    """Forward and backward of one mini-batch (``batch`` = this DP rank's share of it).

    Gradients equal those of the single-device mini-batch loss (summed over DP for raw modules,
    pre-scaled for megatron DDP's averaging, which happens when the caller finalises the gradients);
    the optimizer is not stepped. ``zero_grad_fn`` clears gradients first (default: DDP grad buffers
    zeroed and ``p.grad = None`` on every parameter). ``controls`` are the entropy
    controller's output (None: ``algo_cfg.entropy_coef``); ``max_len`` is the constant of
    ``seq-mean-token-sum-norm`` (default L). ``current_log_prob`` [B, L]: log-probs of ``batch``
    under the current weights when the caller has them (the old log-probs, on the first mini-batch
    of the first epoch), which saves the pre-pass of ``cov_scope=global`` (``current_entropy``
    likewise, for the high-entropy tokens). Returns metrics reduced over DP, identical on every
    rank. ``max_tokens_per_micro_batch`` cuts micro-batches by tokens instead of sequences; the
    normaliser and the selection read the whole mini-batch, so they do not depend on the cut.
    ``pack`` runs each micro-batch as one row without padding (:mod:`megacov.parallel.packing`).
    ``epoch`` (the PPO epoch of this pass) joins ``step`` in Clip-Cov's random keys, so every epoch
    draws anew (:func:`megacov.algorithms.selection.key_stream`; epoch 0 keeps the step's keys).
    """
    chunks = _chunks(model_chunks)
    step = sel.key_stream(step, epoch)
    t0 = time.perf_counter()
    norm = global_normalizer(batch.mask, layout.dp_group, max_len or batch.seq_len)
    selection = prepare_selection(chunks, layout, batch, algo_cfg=algo_cfg, step=step,
                                  temperature=temperature, workspace_mib=workspace_mib,
                                  chunk_size=chunk_size,
                                  real_vocab_size=real_vocab_size, micro_batch_size=micro_batch_size,
                                  max_tokens_per_micro_batch=max_tokens_per_micro_batch,
                                  current_log_prob=current_log_prob, current_entropy=current_entropy)
    t1 = time.perf_counter()
    averaged = _grad_averaged_over_dp(chunks)
    if zero_grad_fn is not None:
        zero_grad_fn()
    else:
        for c in chunks:
            if averaged:
                c.zero_grad_buffer()
            for p in c.parameters():
                p.grad = None
    micro = _micro_batches(batch, layout, micro_batch_size, max_tokens_per_micro_batch)
    scale = float(len(micro) * (layout.dp if averaged else 1))
    own_rule = loss_selection(algo_cfg.policy_loss)
    rows = _packed_rows(micro, layout) if pack else [None] * len(micro)

    def forward_step(data: Iterator[tuple[ActorBatch, Any]], model: torch.nn.Module) -> tuple[Any, Callable]:
        mb, row = next(data)
        output, feed = _forward(model, mb, row)

        def loss_fn(logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
            lp, ent = token_logprob_entropy(logits, feed.input_ids, tp_group=layout.tp_group,
                                            real_vocab_size=real_vocab_size, temperature=temperature,
                                            workspace_mib=workspace_mib, chunk_size=chunk_size,
                                            inplace_backward=True)
            if row is not None:
                lp, ent = row.unpack(lp), (None if ent is None else row.unpack(ent))
            ids = mb.global_token_ids
            loss, metrics = actor_loss(
                lp, mb.old_log_prob, mb.advantages, mb.mask, hp=algo_cfg, norm=norm,
                selected=selection.mask_for(own_rule, ids) if selection else None,
                entropy_keep=selection.mask_for("high_entropy", ids) if selection else None,
                controls=controls, entropy=ent, ref_log_prob=mb.ref_log_prob, loss_weight=mb.loss_weight,
                global_ids=ids, stats=selection.stats if selection else None, step=step)
            return loss * scale, _loss_metrics(metrics, mb)

        return output, loss_fn

    store = _run_schedule(chunks, layout, micro, forward_step, forward_only=False, data=list(zip(micro, rows)),
                          shape=(1, rows[0].length) if pack else None)
    if not averaged:
        _sum_grads_over_dp(chunks, layout)
    t2 = time.perf_counter()
    metrics = _reduce_metrics(store, layout, selection, norm, own_rule) if layout.is_last_stage else None
    metrics = _broadcast_object_from_last_stage(metrics, layout)
    metrics["timing/prepass_s"] = t1 - t0
    metrics["prepass_forwards"] = selection.prepass_forwards if selection else 0
    metrics["timing/update_s"] = t2 - t1
    return metrics


def _packed_rows(micro: list[ActorBatch], layout: ParallelLayout) -> list[Any]:
    """Each micro-batch as one packed row; one row length for all under a pipeline schedule."""
    from megacov.parallel.packing import pack, packed_length

    length = max(packed_length(mb) for mb in micro) if layout.pp > 1 else None
    return [pack(mb, length) for mb in micro]


def _reduce_metrics(store: list[dict[str, Any]], layout: ParallelLayout,
                    selection: StepSelection | None, norm: LossNormalizer, own_rule: str | None) -> dict[str, Any]:
    """Combine the micro-batch metrics of this rank, then over DP (sum / max / min by key)."""
    device = layout.device
    reductions: dict[str, str] = {}
    values: dict[str, torch.Tensor] = {}
    local_ids: dict[str, list[torch.Tensor]] = {"selected_ids": [], "he_selected_ids": []}
    for entry in store:
        for key, v in entry.items():
            if key.endswith("selected_ids"):
                local_ids.setdefault(key, []).append(v)
                continue
            how = METRIC_REDUCTIONS.get(key, "sum")
            reductions[key] = how
            if key not in values:
                values[key] = v.clone()
            elif how == "max":
                values[key] = torch.maximum(values[key], v)
            elif how == "min":
                values[key] = torch.minimum(values[key], v)
            else:
                values[key] = values[key] + v
    out: dict[str, Any] = {}
    for how, op in (("sum", dist.ReduceOp.SUM), ("max", dist.ReduceOp.MAX), ("min", dist.ReduceOp.MIN)):
        keys = sorted(k for k, h in reductions.items() if h == how)
        if keys:
            packed = torch.stack([values[k] for k in keys]).to(device)
            if group_size_rank(layout.dp_group)[0] > 1:
                dist.all_reduce(packed, op=op, group=layout.dp_group)
            out.update({k: float(v) for k, v in zip(keys, packed.tolist())})
    ids = _selected_ids(local_ids["selected_ids"], layout, selection, own_rule)
    he_ids = _selected_ids(local_ids["he_selected_ids"], layout, selection, "high_entropy")
    return _name_metrics(out, ids, he_ids, selection, norm, own_rule)


def _selected_ids(local_ids: list[torch.Tensor], layout: ParallelLayout, selection: StepSelection | None,
                  rule: str | None) -> list[int]:
    if selection is not None and rule in selection.by_rule:
        return [int(i) for i in selection.by_rule[rule].selected_ids.tolist()]
    mine = sorted(int(i) for t in local_ids for i in t.tolist())
    if group_size_rank(layout.dp_group)[0] == 1:
        return mine
    parts: list[Any] = [None] * group_size_rank(layout.dp_group)[0]
    dist.all_gather_object(parts, mine, group=layout.dp_group)
    return sorted(i for p in parts for i in p)


def _name_metrics(raw: dict[str, float], ids: list[int], he_ids: list[int], selection: StepSelection | None,
                  norm: LossNormalizer, own_rule: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    renamed = {"cov_mean": "cov/mean", "cov_max": "cov/max", "cov_min": "cov/min",
               "selected_count": "num_selected", "he_frac": "high_entropy/frac",
               "he_entropy_min": "high_entropy/threshold"}
    for key, v in raw.items():
        if key not in ("cov_sq_mean", "selected_cov_sum", "he_count", "he_entropy_sum"):
            out[renamed.get(key, key)] = v
    if "cov_mean" in raw and "cov_sq_mean" in raw:
        out["cov/std"] = max(raw["cov_sq_mean"] - raw["cov_mean"] ** 2, 0.0) ** 0.5
    if raw.get("selected_count"):
        out["cov/selected_mean"] = raw["selected_cov_sum"] / raw["selected_count"]
    out["num_selected"] = len(ids)
    out["selected_ids"] = ids
    if "he_count" in raw:
        out["high_entropy/num_selected"] = len(he_ids)
        out["he_selected_ids"] = he_ids
        out["high_entropy/entropy_mean"] = raw["he_entropy_sum"] / raw["he_count"] if raw["he_count"] else 0.0
    out["num_tokens"] = norm.num_tokens
    out["num_seqs"] = norm.num_seqs
    if selection is not None and own_rule in selection.by_rule:
        out["cov/n_target"] = selection.by_rule[own_rule].n_target
        out["cov/n_candidates"] = selection.by_rule[own_rule].n_candidates
    return out
