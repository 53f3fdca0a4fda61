"""Per-token log-prob of the target and entropy from vocab-sharded logits, in bounded memory.

The output layer of a tensor-parallel model leaves each rank with logits ``[N, V_pad / TP]``. The
RL losses need, per token, ``log p(target)`` and the entropy ``H = -sum_v p_v log p_v`` of the
temperature-scaled distribution, and both must carry gradient (the entropy bonus).

The usual implementations upcast and keep the whole fp32 softmax for backward, often next to a
clone of the logits (one copy for the cross entropy, which works in place, one for the entropy).
Here the logits are only *read*: rows are processed in chunks of as many tokens as fit a workspace
budget in bytes (``workspace_mib``), each chunk is copied into an fp32 (or fp64) buffer, reduced to
four statistics per token and dropped, so the extra memory is the budget plus a few ``[N]`` vectors,
whatever N and the vocabulary size. Backward recomputes the softmax chunk by chunk
from the saved logits and the saved log-normaliser; it needs no communication because every
quantity coupling the shards (log-normaliser, entropy) was reduced in forward.

Per rank and token the statistics are the local maximum ``m_r`` of ``z = logits / T``, ``s_r =
sum exp(z - m_r)``, ``w_r = sum exp(z - m_r) (z - m_r)`` and the target's ``z`` if this rank holds it.
One all-gather over the TP group (instead of separate max / sum all-reduces) lets every rank combine
them in the same rank order, so all TP ranks obtain bit-identical results:

    g = max_r m_r,  S = sum_r s_r e^{m_r - g},  W = sum_r e^{m_r - g} (w_r + (m_r - g) s_r)
    log Z = g + log S,  log p(t) = z_t - log Z,  H = log S - W / S

Vocab padding: columns whose global index is ``>= real_vocab_size`` are never read, so padded
rows of the output layer cannot leak into the normaliser or the entropy, and get zero gradient.
A shard made entirely of padding contributes ``m = -inf, s = w = 0``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def group_size_rank(group: Any) -> tuple[int, int]:
    """(size, rank) of ``group``; (1, 0) when there is no group or no process group at all."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def all_gather_stacked(t: torch.Tensor, group: Any) -> torch.Tensor:
    """[*S] from every rank of ``group`` -> [size, *S] in group-rank order (same on every rank)."""
    size, _ = group_size_rank(group)
    if size == 1:
        return t.unsqueeze(0)
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def vocab_shard(tp_rank: int, local_vocab: int, real_vocab_size: int) -> tuple[int, int]:
    """(first global column, number of real columns) of the shard held by ``tp_rank``."""
    start = tp_rank * local_vocab
    return start, max(0, min(local_vocab, real_vocab_size - start))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are fp32 for fp32/bf16/fp16 logits and fp64 for fp64 logits (references)."""
    return torch.promote_types(dtype, torch.float32)


DEFAULT_WORKSPACE_MIB = 16.0
"""Default budget of the two work buffers. Small on purpose: the kernel streams over the logits,
so a few MiB per chunk already run at memory speed on CPU; GPUs, where every chunk costs a dozen
kernel launches, want a few hundred MiB (``parallel.logprob_workspace_mib``)."""


def chunk_rows(n: int, n_valid: int, dtype: torch.dtype, workspace_mib: float,
               chunk_size: int | None = None) -> int:
    """Tokens per chunk: the most rows whose two work buffers (``n_valid`` columns in the compute
    dtype) fit in ``workspace_mib``, at least one, at most ``chunk_size`` (a cap) and ``n``."""
    row_bytes = 2 * max(1, n_valid) * torch.empty((), dtype=compute_dtype(dtype)).element_size()
    rows = max(1, int(workspace_mib * 2**20) // row_bytes)
    if chunk_size is not None:
        rows = min(rows, chunk_size)
    return max(1, min(rows, n))


def _workspace(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Two chunk-sized buffers reused by every chunk: fresh allocations of this size would be
    page-faulted in (CPU) or churn the caching allocator (GPU) once per chunk."""
    return (torch.empty(rows, cols, dtype=dtype, device=device),
            torch.empty(rows, cols, dtype=dtype, device=device))


def _shifted(x: torch.Tensor, shift: torch.Tensor, inv_t: float, out: torch.Tensor) -> torch.Tensor:
    """``out = x / T - shift[:, None]`` without a temporary: logits of another dtype (bf16) are
    copied into the buffer and shifted in place, because a mixed-dtype ``add(..., out=)`` would
    first materialise an upcast copy of the whole chunk."""
    if x.dtype == out.dtype:
        if inv_t == 1.0:
            return torch.sub(x, shift.unsqueeze(-1), out=out)
        return torch.add(-shift.unsqueeze(-1), x, alpha=inv_t, out=out)
    out.copy_(x)
    if inv_t != 1.0:
        out.mul_(inv_t)
    return out.sub_(shift.unsqueeze(-1))


def _local_stats(logits: torch.Tensor, local_target: torch.Tensor, n_valid: int, inv_t: float,
                 chunk: int, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, 4] statistics (m, s, w, z_target) of this shard, computed chunk by chunk, and [N] flags
    of the rows where a logit is -inf (a masked entry; backward must not turn ``0 * inf`` into NaN).

    A -inf logit has p = 0 and contributes nothing, but ``p * z`` is ``0 * -inf = NaN``; such rows
    (rare, detected by the NaN they leave in ``w``) are summed again with those entries dropped. A
    shard whose real logits are all -inf is shifted by 0 instead of its max and so contributes
    ``m = -inf, s = w = 0``, like a padded shard.
    """
    n = logits.shape[0]
    cdt = compute_dtype(logits.dtype)
    stats = torch.zeros(n, 4, dtype=cdt, device=logits.device)
    masked = torch.zeros(n, dtype=torch.bool, device=logits.device)
    if n_valid == 0:
        stats[:, 0] = float("-inf")
        return stats, masked
    here = (local_target >= 0) & (local_target < n_valid)
    safe_t = torch.where(here, local_target, torch.zeros_like(local_target))
    z_buf, p_buf = _workspace(min(chunk, n), n_valid, cdt, logits.device)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x = logits[s:e, :n_valid]
        z, p = z_buf[:e - s], p_buf[:e - s]
        m = x.amax(dim=-1).to(cdt) * inv_t  # max commutes with the positive scale 1/T
        shift = torch.where(m == float("-inf"), torch.zeros_like(m), m)
        _shifted(x, shift, inv_t, z)
        # the target's logit straight from the input: one rounding (1/T) instead of three
        zt = x.gather(1, safe_t[s:e].unsqueeze(1)).squeeze(1).to(cdt) * inv_t
        stats[s:e, 0] = m
        stats[s:e, 3] = torch.where(here[s:e], zt, torch.zeros_like(zt))
        torch.exp(z, out=p)
        stats[s:e, 1] = p.sum(dim=-1)
        if with_entropy:
            w = p.mul_(z).sum(dim=-1)
            bad = torch.isnan(w)
            if bool(bad.any()):
                rows = bad.nonzero().squeeze(1)
                zr = z[rows]
                pz = torch.exp(zr).mul_(zr).masked_fill_(torch.isneginf(zr), 0.0)
                w[rows] = pz.sum(dim=-1)
                masked[s + rows] = True
            stats[s:e, 2] = w
    return stats, masked


def _combine(gathered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[TP, N, 4] per-rank statistics -> (log Z, entropy, target z), each [N], in float64.

    These are a few [N] vectors: float64 costs nothing here and leaves the output's own rounding
    as the only error of this step (fp32 at |log p| ~ 100 is ~4e-6 by itself).
    """
    m, s, w, zt = gathered.double().unbind(dim=-1)
    g = m.amax(dim=0)
    has = s > 0  # a fully padded or masked shard (m = -inf) must not produce inf * 0
    shift = torch.where(has, m - g, torch.zeros_like(m))
    scale = torch.where(has, torch.exp(shift), torch.zeros_like(m))
    big_s = (s * scale).sum(dim=0)
    big_w = (scale * (w + shift * s)).sum(dim=0)
    log_s = torch.log(big_s)
    return g + log_s, log_s - big_w / big_s, zt.sum(dim=0)


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    """logits [N, V_local] (sharded over ``tp_group``) -> (log p(target) [N], entropy [N])."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, temperature: float, chunk: int,
                vocab_start: int, n_valid: int, tp_group: Any, with_entropy: bool,
                inplace_backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
        inv_t = 1.0 / float(temperature)
        local_target = target - vocab_start
        stats, masked = _local_stats(logits, local_target, n_valid, inv_t, chunk, with_entropy)
        tp, _ = group_size_rank(tp_group)
        gathered = all_gather_stacked(stats, tp_group) if tp > 1 else stats.unsqueeze(0)
        lse, entropy, zt = _combine(gathered)
        cdt = stats.dtype
        logp = (zt - lse).to(cdt)
        entropy = entropy.to(cdt) if with_entropy else torch.zeros_like(logp)
        lse = lse.to(cdt)
        ctx.save_for_backward(logits, local_target, lse, entropy, masked)
        ctx.inv_t, ctx.chunk, ctx.n_valid = inv_t, chunk, n_valid
        ctx.with_entropy, ctx.inplace = with_entropy, inplace_backward
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, g_lp: torch.Tensor | None, g_h: torch.Tensor | None) -> tuple:
        logits, local_target, lse, entropy, masked = ctx.saved_tensors
        # dlogp_t/dz = onehot_t - p;  dH/dz = -p (log p + H);  d/dlogits = d/dz / T
        use_h = g_h is not None and ctx.with_entropy
        grad = logits if (ctx.inplace and logits.is_contiguous()) else torch.empty_like(logits)
        nv, n = ctx.n_valid, logits.shape[0]
        if nv < logits.shape[1]:
            grad[:, nv:] = 0
        if nv == 0:
            return (grad,) + (None,) * 8
        cdt = lse.dtype
        here = (local_target >= 0) & (local_target < nv)
        safe_t = torch.where(here, local_target, torch.zeros_like(local_target))
        glp = g_lp.to(cdt) if g_lp is not None else torch.zeros_like(lse)
        # grad_z = -p (a log p + b) + glp onehot, with a = gh, b = gh H + glp; the 1/T of the
        # chain rule is folded into a and b (and into the one-hot term).
        a = -g_h.to(cdt) * ctx.inv_t if use_h else None
        b = -(g_h.to(cdt) * entropy + glp) * ctx.inv_t if use_h else -glp * ctx.inv_t
        hit = torch.where(here, glp * ctx.inv_t, torch.zeros_like(glp))
        z_buf, p_buf = _workspace(min(ctx.chunk, n), nv, cdt, logits.device)
        direct = grad.dtype == cdt
        for s in range(0, n, ctx.chunk):
            e = min(n, s + ctx.chunk)
            z, p = z_buf[:e - s], p_buf[:e - s]
            _shifted(logits[s:e, :nv], lse[s:e], ctx.inv_t, z)  # log p
            torch.exp(z, out=p)
            if a is not None:
                rows = masked[s:e].nonzero().squeeze(1)
                if rows.numel():  # -inf logits: p = 0 there, keep a * log p finite
                    z[rows] = z[rows].masked_fill_(torch.isneginf(z[rows]), 0.0)
                factor = torch.addcmul(b[s:e].unsqueeze(-1), z, a[s:e].unsqueeze(-1), out=z)
            else:
                factor = b[s:e].unsqueeze(-1)
            # This chunk of the logits has been read: writing its gradient over it is safe.
            out = grad[s:e, :nv]
            if direct:
                torch.mul(p, factor, out=out)
            else:
                out.copy_(p.mul_(factor))
            out[torch.arange(e - s, device=out.device), safe_t[s:e]] += hit[s:e].to(out.dtype)
        return (grad,) + (None,) * 8


def vocab_parallel_logprob_entropy(logits: torch.Tensor, target: torch.Tensor, *, tp_group: Any,
                                   real_vocab_size: int, temperature: float = 1.0,
                                   workspace_mib: float = DEFAULT_WORKSPACE_MIB,
                                   chunk_size: int | None = None, with_entropy: bool = True,
                                   inplace_backward: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``target`` and entropy of softmax(logits / temperature) over the real vocab.

    ``logits``: [N, V_pad / TP], this rank's contiguous vocab shard (rank r holds columns
    ``[r * V_local, (r + 1) * V_local)``), any float dtype; ``target``: [N] global token ids.
    Returns two [N] tensors in fp32 (fp64 for fp64 logits), identical on every TP rank. With
    ``with_entropy=False`` the entropy pass is skipped and zeros are returned. Logits of -inf
    (masked vocabulary entries) have probability 0 and get gradient 0.

    ``workspace_mib`` bounds the kernel's own memory (two fp32 buffers of a token chunk): the chunk
    is the largest that fits, so the saving does not depend on N or on the vocabulary size.
    ``chunk_size`` additionally caps the chunk in tokens (tests use it to cross chunk boundaries).

    ``inplace_backward`` writes the gradient into the logits' storage instead of allocating a second
    logits-sized buffer; only valid when nothing else reads the logits after this call (the
    training loss: megatron's output layer does not keep its output). Another autograd node that
    saved the same logits would then fail loudly on its version check, never silently.
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [N, V] and target [N], got {tuple(logits.shape)} and "
                         f"{tuple(target.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not workspace_mib > 0:
        raise ValueError(f"workspace_mib must be > 0, got {workspace_mib}")
    _, tp_rank = group_size_rank(tp_group)
    start, n_valid = vocab_shard(tp_rank, logits.shape[1], real_vocab_size)
    chunk = chunk_rows(logits.shape[0], n_valid, logits.dtype, workspace_mib, chunk_size)
    return _VocabParallelLogProbEntropy.apply(logits, target.long(), float(temperature), chunk,
                                              start, n_valid, tp_group, bool(with_entropy),
                                              bool(inplace_backward))


def next_token_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, L]: position t predicts input_ids[:, t + 1]; the last column gets token 0."""
    return torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1)


def token_logprob_entropy(logits: torch.Tensor, input_ids: torch.Tensor, *, tp_group: Any,
                          real_vocab_size: int, temperature: float = 1.0,
                          workspace_mib: float = DEFAULT_WORKSPACE_MIB, chunk_size: int | None = None,
                          with_entropy: bool = True, inplace_backward: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Model output [B, L, V_local] and inputs [B, L] -> (log_prob [B, L], entropy [B, L]).

    Column t holds log p(input_ids[:, t] | input_ids[:, :t]) and the entropy of that prediction
    (made at position t - 1); column 0 has no prediction and is 0. All L rows of the logits are fed
    to the kernel (the last row with a dummy target) so the [B*L, V] view needs no copy.
    """
    b, length, v_local = logits.shape
    flat = logits.reshape(b * length, v_local)
    lp, ent = vocab_parallel_logprob_entropy(
        flat, next_token_targets(input_ids).reshape(-1), tp_group=tp_group,
        real_vocab_size=real_vocab_size, temperature=temperature, workspace_mib=workspace_mib,
        chunk_size=chunk_size, with_entropy=with_entropy, inplace_backward=inplace_backward)
    zero = torch.zeros(b, 1, dtype=lp.dtype, device=lp.device)
    lp = torch.cat([zero, lp.view(b, length)[:, :-1]], dim=1)
    ent = torch.cat([zero, ent.view(b, length)[:, :-1]], dim=1)
    return lp, ent


def reference_logprob_entropy(full_logits: torch.Tensor, target: torch.Tensor, real_vocab_size: int,
                              temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain float64 log_softmax over the real vocab: [N, V] -> ([N], [N]) (tests, verification)."""
    z = full_logits[:, :real_vocab_size].double() / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    lp = logp_all.gather(1, target.long().unsqueeze(1)).squeeze(1)
    return lp, -(logp_all.exp() * logp_all).sum(dim=-1)
