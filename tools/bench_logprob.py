"""Vocab-parallel log-prob + entropy: megacov's chunked kernel vs the usual unfused path, on CPU.

    python tools/bench_logprob.py                        # default cases (see --cases)
    python tools/bench_logprob.py --cases 8192x32768 --tp 1,2 --repeats 3
    python tools/bench_logprob.py --skip-prepass         # only the kernel table

Each measurement runs in fresh processes (``tp`` gloo ranks, megatron's parallel state set up, one
thread each). A step is: per-token log-prob of the target and entropy from logits [N, V/TP], a
weighted sum of both, and the gradient with respect to the logits. Two implementations:

* ``megacov``: :func:`megacov.parallel.vocab_parallel.vocab_parallel_logprob_entropy` as the
  training loss uses it (token chunks of ``--chunk`` rows, gradient written over the logits).
* ``baseline``: megatron's ``vocab_parallel_cross_entropy`` on a clone of the logits (it works in
  place) plus an entropy autograd function that keeps the logits and the softmax for backward, i.e.
  the common unfused actor path (written out here).

Time is the best of ``--repeats``; *extra peak memory* is the peak resident set during the step
minus the resident set just before it (Linux ``/proc/self/clear_refs`` resets the peak), on rank 0.
The ratio columns divide by the baseline measured in the same run. A second table times the global
Clip-Cov pre-pass (forward-only log-probs with the current weights) against the update pass of
:func:`megacov.parallel.actor.train_step` on a small megatron GPT.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch

_PROC = "/proc/self"


def _status_kib(key: str) -> int:
    with open(f"{_PROC}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    with open(f"{_PROC}/clear_refs", "w") as f:
        f.write("5")


class _Entropy(torch.autograd.Function):
    """Vocab-parallel entropy the common way: three all-reduces, logits and softmax kept for backward."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, group: Any) -> torch.Tensor:
        import torch.distributed as dist

        m = logits.max(dim=-1, keepdim=True).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        p = torch.exp(logits - m)
        s = p.sum(dim=-1, keepdim=True)
        dist.all_reduce(s, group=group)
        p.div_(s)
        pz = (p * logits).sum(dim=-1, keepdim=True)
        dist.all_reduce(pz, group=group)
        h = m + torch.log(s) - pz
        ctx.save_for_backward(logits, p, pz)
        return h.squeeze(-1)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        logits, p, sum_pz = ctx.saved_tensors
        # dH/dz = -p (log p + H) = p * (sum_v p z - z), with the all-reduced sum_v p z
        return g.unsqueeze(-1) * p * (sum_pz - logits), None


def _baseline(x: torch.Tensor, target: torch.Tensor, temperature: float, group: Any) -> tuple:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    if temperature != 1.0:
        x = x.div_(temperature)  # in place, as the common path does
    entropy = _Entropy.apply(x, group)
    logp = -vocab_parallel_cross_entropy(x.clone(), target)
    return logp, entropy


def _ours(x: torch.Tensor, target: torch.Tensor, temperature: float, group: Any, real_vocab: int,
          chunk: int) -> tuple:
    from megacov.parallel.vocab_parallel import vocab_parallel_logprob_entropy

    return vocab_parallel_logprob_entropy(x, target, tp_group=group, real_vocab_size=real_vocab,
                                          temperature=temperature, chunk_size=chunk, inplace_backward=True)


def kernel_worker(rank: int, world: int, method: str, n: int, vocab: int, chunk: int, temperature: float,
                  repeats: int) -> dict[str, float]:
    from megacov.parallel.layout import ParallelLayout

    layout = ParallelLayout.initialize(world, 1, seed=0)
    try:
        g = torch.Generator().manual_seed(rank)
        v_local = vocab // world
        target = torch.randint(0, vocab, (n,), generator=g)
        w_lp, w_h = torch.randn(n, generator=g), torch.randn(n, generator=g)
        best, extra = float("inf"), 0
        for _ in range(repeats):
            with torch.no_grad():
                base = torch.empty(n, v_local).normal_(generator=g)
            # a non-leaf with its own storage, like the output layer's logits
            x = base + torch.zeros((), requires_grad=True)
            del base
            torch.distributed.barrier()
            before = _status_kib("VmRSS")
            _reset_peak()
            t0 = time.perf_counter()
            if method == "baseline":
                lp, ent = _baseline(x, target, temperature, layout.tp_group)
            else:
                lp, ent = _ours(x, target, temperature, layout.tp_group, vocab, chunk)
            loss = (lp * w_lp).sum() + (ent * w_h).sum()
            (grad,) = torch.autograd.grad(loss, x)
            elapsed = time.perf_counter() - t0
            extra = max(extra, (_status_kib("VmHWM") - before) * 1024)
            best = min(best, elapsed)
            del lp, ent, loss, grad, x
        return {"time_s": best, "extra_bytes": float(extra), "logits_bytes": float(n * v_local * 4)}
    finally:
        layout.destroy()


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
            m = train_step([model], layout, shard, algo_cfg=hp, step=0, temperature=1.0, chunk_size=1024,
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="8192x32768,1024x152064",
                    help="NxV token-count x vocab pairs (152k x 8k fp32 logits are 5 GB: scaled to N=1024 "
                         "by default on a shared CPU machine)")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--chunk", type=int, default=1024, help="token chunk of the megacov kernel")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-prepass", action="store_true")
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    from megacov.parallel.spawn import run_distributed

    print(f"# {__doc__.splitlines()[0]}\n# python {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}, 1 thread per rank, chunk {args.chunk}, T={args.temperature}, "
          f"best of {args.repeats}; memory on rank 0\n")
    head = (f"{'N':>6} {'V':>7} {'TP':>3} {'method':<9} {'time s':>8} {'extra MB':>9} {'x logits':>8} "
            f"{'time/base':>9} {'mem/base':>8}")
    print(head)
    print("-" * len(head))
    for n, v in _parse_cases(args.cases):
        for tp in (int(x) for x in args.tp.split(",")):
            res = {m: run_distributed(kernel_worker, tp, m, n, v, args.chunk, args.temperature, args.repeats,
                                      timeout_s=1800)[0] for m in ("baseline", "megacov")}
            base = res["baseline"]
            for m, r in res.items():
                print(f"{n:>6} {v:>7} {tp:>3} {m:<9} {r['time_s']:>8.3f} {r['extra_bytes'] / 2**20:>9.0f} "
                      f"{r['extra_bytes'] / r['logits_bytes']:>8.2f} {r['time_s'] / base['time_s']:>9.2f} "
                      f"{r['extra_bytes'] / max(base['extra_bytes'], 1):>8.2f}", flush=True)
    if not args.skip_prepass:
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
