"""Vocab-parallel log-prob + entropy, forward + backward: megacov's kernel vs verl's path vs naive torch.

    python tools/bench_logprob.py                             # the default grid (see --cases)
    python tools/bench_logprob.py --cases 4096x32768 --dtypes bf16 --tp 2 --repeats 3
    python tools/bench_logprob.py --prepass                   # also time train_step's global pre-pass

One measurement = one (N x V, dtype, TP, method) in fresh processes (``tp`` gloo ranks, one thread
each), so every peak is that method's own. A step computes, from logits [N, V/TP] (a non-leaf with
its own storage, like the output layer's), the per-token log-prob of the target and the entropy, a
weighted sum of both, and the gradient with respect to the logits. Methods:

* ``megacov``: :func:`megacov.parallel.vocab_parallel.vocab_parallel_logprob_entropy` as the training
  loss calls it (workspace ``--workspace-mib``, gradient written over the logits).
* ``verl``: verl's Megatron actor path, written out here from its published structure: an entropy
  autograd function in the logits' dtype (max / sum-exp / sum p*z all-reduced over TP; logits and
  softmax saved; backward in place in the saved softmax), and log-probs = -megatron's
  ``vocab_parallel_cross_entropy`` (fp32, in place, softmax saved) on a clone of fp32 logits (it
  would otherwise overwrite the logits the entropy saved; bf16 logits are copied by its upcast). This
  is the leanest form of that path: no extra copies beyond what its structure needs.
* ``naive``: all-gather the vocabulary (autograd), fp32 ``log_softmax``, gather, ``-(p log p).sum``.

Time is the best of ``--repeats``. *Extra peak* is the peak resident set during the step minus the
resident set just before it (Linux ``/proc/self/clear_refs`` resets ``VmHWM``), the largest over
ranks and repeats. Errors are against float64 ``log_softmax`` of the same (dtype-rounded) logits on
``--error-rows`` rows spread over the batch (all rows when N is smaller): max |log p - ref|, max
|H - ref|, and for the first 32 of them the max gradient error relative to the largest reference
gradient. Ratio columns divide by ``verl`` of the same case, measured in the same run.

Cases whose estimated footprint (logits plus a method's expected extra, all ranks together) exceeds
``--max-gib`` are skipped and listed: the default grid stops at N=4096 for V=152064 (16384 x 152064
fp32 logits alone are 9.3 GiB) on a shared 24 GiB machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch

_PROC = "/proc/self"
METHODS = ("verl", "megacov", "naive")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GRAD_ROWS = 32


def _status_kib(key: str) -> int:
    with open(f"{_PROC}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    with open(f"{_PROC}/clear_refs", "w") as f:
        f.write("5")


class _VerlEntropy(torch.autograd.Function):
    """Entropy of vocab-sharded logits the way verl's Megatron actor computes it."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, group: Any) -> torch.Tensor:
        import torch.distributed as dist

        m = logits.max(dim=-1, keepdim=True).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        p = torch.sub(logits, m).exp_()  # the one logits-sized buffer: becomes the softmax
        s = p.sum(dim=-1, keepdim=True)
        dist.all_reduce(s, group=group)
        p.div_(s)
        spz = (p * logits).sum(dim=-1, keepdim=True)
        dist.all_reduce(spz, group=group)
        ctx.save_for_backward(logits, p, spz)
        return (m + torch.log(s) - spz).squeeze(-1)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        logits, p, spz = ctx.saved_tensors
        # dH/dz = -p (z - sum p z), built in the saved softmax; the logits are shifted and restored
        logits.sub_(spz)
        p.mul_(logits)
        logits.add_(spz)
        return p.mul_(-g.unsqueeze(-1)), None


def _verl(x: torch.Tensor, target: torch.Tensor, temperature: float, group: Any, **_: Any) -> tuple:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    if temperature != 1.0:
        x = x.div(temperature)
    entropy = _VerlEntropy.apply(x, group)
    ce_in = x.clone() if x.dtype == torch.float32 else x
    return -vocab_parallel_cross_entropy(ce_in, target), entropy


class _GatherVocab(torch.autograd.Function):
    """[N, V/TP] shards -> [N, V] on every rank; backward keeps this rank's columns (every rank
    computes the same loss from the full rows, so nothing is summed)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        import torch.distributed as dist

        world, rank = dist.get_world_size(group), dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.cols = (rank * x.shape[1], (rank + 1) * x.shape[1])
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        a, b = ctx.cols
        return g[:, a:b].contiguous(), None


def _naive(x: torch.Tensor, target: torch.Tensor, temperature: float, group: Any, world: int,
           **_: Any) -> tuple:
    full = _GatherVocab.apply(x, group) if world > 1 else x
    z = full.float() / temperature
    logp = torch.log_softmax(z, dim=-1)
    return logp.gather(1, target.unsqueeze(1)).squeeze(1), -(logp.exp() * logp).sum(dim=-1)


def _megacov(x: torch.Tensor, target: torch.Tensor, temperature: float, group: Any, vocab: int,
             workspace_mib: float, **_: Any) -> tuple:
    from megacov.parallel.vocab_parallel import vocab_parallel_logprob_entropy

    return vocab_parallel_logprob_entropy(x, target, tp_group=group, real_vocab_size=vocab,
                                          temperature=temperature, workspace_mib=workspace_mib,
                                          inplace_backward=True)


_IMPL = {"verl": _verl, "megacov": _megacov, "naive": _naive}


def _logits(rank: int, n: int, v_local: int, dtype: torch.dtype, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + rank)
    with torch.no_grad():
        return torch.empty(n, v_local).normal_(generator=g).mul_(scale).to(dtype)


def _errors(rank: int, world: int, group: Any, n: int, v_local: int, dtype: torch.dtype, scale: float,
            temperature: float, target: torch.Tensor, w: tuple, rows: torch.Tensor, lp: torch.Tensor,
            ent: torch.Tensor, grad_rows: torch.Tensor) -> tuple[float, float, float]:
    """Max errors vs a float64 log_softmax of the full rows ``rows`` (gathered over TP)."""
    import torch.distributed as dist

    local = _logits(rank, n, v_local, dtype, scale)[rows]
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    full = torch.cat(parts, dim=1).double().div_(temperature).requires_grad_()
    ref_lp_all = torch.log_softmax(full, dim=-1)
    ref_lp = ref_lp_all.gather(1, target[rows].unsqueeze(1)).squeeze(1)
    ref_h = -(ref_lp_all.exp() * ref_lp_all).sum(dim=-1)
    k = grad_rows.shape[0]
    loss = (ref_lp[:k] * w[0][rows[:k]].double()).sum() + (ref_h[:k] * w[1][rows[:k]].double()).sum()
    (ref_grad,) = torch.autograd.grad(loss, full)
    ref_grad = ref_grad[:k, rank * v_local:(rank + 1) * v_local] / temperature
    e_lp = (lp[rows].double() - ref_lp.detach()).abs().max().item()
    e_h = (ent[rows].double() - ref_h.detach()).abs().max().item()
    e_g = ((grad_rows.double() - ref_grad).abs().max() / ref_grad.abs().max()).item()
    return e_lp, e_h, e_g


def kernel_worker(rank: int, world: int, method: str, n: int, vocab: int, dtype_name: str,
                  temperature: float, workspace_mib: float, repeats: int, scale: float,
                  error_rows: int) -> dict[str, float]:
    import torch.distributed as dist

    layout = None
    if method == "verl":  # megatron's cross entropy reads the TP group from its parallel state
        from megacov.parallel.layout import ParallelLayout

        layout = ParallelLayout.initialize(world, 1, seed=0)
        group = layout.tp_group
    else:
        dist.init_process_group("gloo")
        group = dist.group.WORLD
    try:
        dtype, v_local = DTYPES[dtype_name], vocab // world
        g = torch.Generator().manual_seed(0)  # the same targets and weights on every rank
        target = torch.randint(0, vocab, (n,), generator=g)
        w = (torch.randn(n, generator=g), torch.randn(n, generator=g))
        rows = torch.linspace(0, n - 1, min(n, error_rows)).round().long().unique()
        best, extra = float("inf"), 0
        for _ in range(repeats):
            base = _logits(rank, n, v_local, dtype, scale)
            x = base + torch.zeros((), dtype=dtype, requires_grad=True)
            del base
            dist.barrier(group=group)
            before = _status_kib("VmRSS")
            _reset_peak()
            t0 = time.perf_counter()
            lp, ent = _IMPL[method](x, target, temperature, group, vocab=vocab, world=world,
                                    workspace_mib=workspace_mib)
            loss = (lp * w[0].to(lp.dtype)).sum() + (ent * w[1].to(ent.dtype)).sum()
            (grad,) = torch.autograd.grad(loss, x)
            elapsed = time.perf_counter() - t0
            extra = max(extra, (_status_kib("VmHWM") - before) * 1024)
            best = min(best, elapsed)
            lp, ent, grad_rows = lp.detach(), ent.detach(), grad[rows[:GRAD_ROWS]].clone()
            del loss, grad, x
        errs = _errors(rank, world, group, n, v_local, dtype, scale, temperature, target, w, rows, lp, ent,
                       grad_rows)
        return {"time_s": best, "extra_bytes": float(extra), "logits_bytes": float(n * v_local * dtype.itemsize),
                "err_lp": errs[0], "err_h": errs[1], "err_grad": errs[2], "rows": float(rows.numel())}
    finally:
        if layout is not None:
            layout.destroy()
        else:
            dist.destroy_process_group()


def prepass_worker(rank: int, world: int, tp: int, hidden: int, layers: int, vocab: int, batch: int,
                   seq_len: int, micro: int, repeats: int) -> dict[str, float]:
    """Time train_step's global pre-pass and update pass on a small GPT (Clip-Cov, scope global)."""
    from megacov.algorithms import algorithm_hparams
    from megacov.models.core import build_gpt_model
    from megacov.parallel.actor import train_step
    from megacov.parallel.batch import ActorBatch
    from megacov.verify.exactness import TinySpec, transformer_config
    from megacov.parallel.layout import ParallelLayout

    layout = ParallelLayout.initialize(tp, 1, seed=0)
    try:
        spec = TinySpec(num_layers=layers, hidden=hidden, heads=hidden // 32, groups=hidden // 64 or 1,
                        head_dim=32, ffn=hidden * 3, vocab=vocab, vocab_multiple=128)
        model = build_gpt_model(transformer_config(spec, tp, 1, torch.float32), layout,
                                vocab_size=spec.padded_vocab, max_sequence_length=seq_len)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
        mask = torch.zeros(batch, seq_len)
        mask[:, seq_len // 4:] = 1
        data = ActorBatch(input_ids=ids, position_ids=torch.arange(seq_len).expand(batch, seq_len).clone(),
                          response_mask=mask, old_log_prob=-3 + 0.1 * torch.randn(batch, seq_len, generator=g),
                          advantages=torch.randn(batch, 1, generator=g).expand(batch, seq_len) * mask,
                          global_seq_ids=torch.arange(batch), seq_len=seq_len)
        shard = data.shard(layout.dp_rank, layout.dp)
        hp = algorithm_hparams(policy_loss="clip_cov", cov_scope="global")
        pre, upd = float("inf"), float("inf")
        for _ in range(repeats):
            m = train_step([model], layout, shard, algo_cfg=hp, step=0, temperature=1.0,
                           real_vocab_size=vocab, micro_batch_size=micro)
            pre, upd = min(pre, m["timing/prepass_s"]), min(upd, m["timing/update_s"])
        return {"prepass_s": pre, "update_s": upd}
    finally:
        layout.destroy()


def _parse_cases(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        n, v = item.lower().split("x")
        out.append((int(n), int(v)))
    return out


def _estimate_gib(method: str, n: int, v: int, dtype: torch.dtype, tp: int) -> float:
    """Rough footprint of one case, all ranks: logits plus the method's expected extra."""
    logits = n * v * dtype.itemsize
    fp32 = n * v * 4
    extra = {"megacov": 0.0, "verl": logits + 1.5 * fp32, "naive": tp * 4 * fp32}[method]
    return (logits + extra) / 2**30


def main(argv: list[str] | None = None) -> int:
    from megacov.parallel.vocab_parallel import DEFAULT_WORKSPACE_MIB

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="1024x32768,4096x32768,16384x32768,1024x152064,4096x152064",
                    help="NxV pairs (token count x vocabulary)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--workspace-mib", type=float, default=DEFAULT_WORKSPACE_MIB,
                    help="megacov's workspace budget (parallel.logprob_workspace_mib)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--scale", type=float, default=4.0, help="logits ~ N(0, scale^2)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--error-rows", type=int, default=512)
    ap.add_argument("--max-gib", type=float, default=9.0, help="skip cases estimated above this footprint")
    ap.add_argument("--prepass", action="store_true", help="also time the global Clip-Cov pre-pass")
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # megatron's missing-apex notices, once per process
    from megacov.parallel.spawn import run_distributed

    methods = [m for m in args.methods.split(",") if m]
    print(f"# {__doc__.splitlines()[0]}\n# python {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}, 1 thread per rank, megacov workspace {args.workspace_mib:g} MiB, "
          f"T={args.temperature}, logits N(0, {args.scale:g}^2), best of {args.repeats}; extra peak = max over "
          f"ranks; errors vs float64 on up to {args.error_rows} rows (grad: first {GRAD_ROWS})\n")
    head = (f"{'N':>6} {'V':>7} {'dtype':>5} {'TP':>2} {'method':<8} {'time s':>7} {'extra MB':>9} "
            f"{'x logits':>8} {'time/verl':>9} {'mem/verl':>8} {'logp err':>9} {'H err':>9} {'grad err':>9}")
    print(head)
    print("-" * len(head), flush=True)
    skipped = []
    t_start = time.perf_counter()
    for n, v in _parse_cases(args.cases):
        for dname in args.dtypes.split(","):
            for tp in (int(x) for x in args.tp.split(",")):
                res = {}
                for m in methods:
                    est = _estimate_gib(m, n, v, DTYPES[dname], tp)
                    if est > args.max_gib:
                        skipped.append(f"{n}x{v} {dname} TP{tp} {m} (est. {est:.1f} GiB)")
                        continue
                    out = run_distributed(kernel_worker, tp, m, n, v, dname, args.temperature, args.workspace_mib,
                                          args.repeats, args.scale, args.error_rows, timeout_s=3600)
                    r = dict(out[0])
                    r["extra_bytes"] = max(o["extra_bytes"] for o in out)
                    res[m] = r
                base = res.get("verl")
                for m, r in res.items():
                    t_ratio = f"{r['time_s'] / base['time_s']:>9.2f}" if base else f"{'-':>9}"
                    m_ratio = f"{r['extra_bytes'] / max(base['extra_bytes'], 1):>8.3f}" if base else f"{'-':>8}"
                    print(f"{n:>6} {v:>7} {dname:>5} {tp:>2} {m:<8} {r['time_s']:>7.3f} "
                          f"{r['extra_bytes'] / 2**20:>9.1f} {r['extra_bytes'] / r['logits_bytes']:>8.3f} "
                          f"{t_ratio} {m_ratio} {r['err_lp']:>9.2e} {r['err_h']:>9.2e} {r['err_grad']:>9.2e}",
                          flush=True)
    if skipped:
        print(f"\n# skipped (over --max-gib {args.max_gib:g}): " + "; ".join(skipped))
    print(f"# total {time.perf_counter() - t_start:.0f} s")
    if args.prepass:
        print("\n# global pre-pass (forward-only, current weights) vs update pass of train_step; GPT hidden 256,"
              " 4 layers, V 32768, 16 x 256 tokens, micro-batch 4")
        head = f"{'TP':>3} {'prepass s':>10} {'update s':>9} {'prepass/update':>15}"
        print(head)
        print("-" * len(head))
        for tp in (int(x) for x in args.tp.split(",")):
            r = run_distributed(prepass_worker, tp, tp, 256, 4, 32768, 16, 256, 4, args.repeats, timeout_s=1800)[0]
            print(f"{tp:>3} {r['prepass_s']:>10.3f} {r['update_s']:>9.3f} {r['prepass_s'] / r['update_s']:>15.2f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
