"""Cost of the entropy-preserving losses relative to plain PPO on ~1M response tokens.

    python tools/bench_losses.py                 # CPU, 1 thread, 1024 x 1024 positions
    python tools/bench_losses.py --device cuda   # also counts device-to-host copies

Rows: megacov's ppo / clip_cov / kl_cov (deterministic, layout-independent selection, everything
on the tensors' device), and for comparison the per-scope algorithm of the reference
implementation written out here (Clip-Cov: boolean indexing + ``torch.randperm``; KL-Cov: the
valid tokens copied to the host, then ``torch.topk``). Ratios are against megacov's ppo measured
in the same run. Times are the best of ``--repeats`` runs after ``--warmup`` runs (the minimum is
the estimate least disturbed by other processes on a shared machine).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from megacov.algorithms import LossNormalizer, algorithm_hparams, get_policy_loss


def make_batch(B: int, T: int, device: str, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lens.unsqueeze(1)
    lp = -torch.rand(B, T, generator=g).pow(2) * 6
    old = lp + 0.05 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    return tuple(t.to(device) for t in (lp, old, adv, mask))


def reference_clip_cov(lp, old, adv, mask, hp, norm):
    """The reference algorithm: per-scope means, boolean indexing and an unseeded randperm."""
    m = mask.float()
    ratio = torch.exp(lp - old)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - hp.clip_ratio_low, 1 + hp.clip_ratio_high)
    clipped = (pg2 > pg1) & mask
    mean_a = (adv * m).sum() / m.sum()
    mean_lp = (lp.detach() * m).sum() / m.sum()
    cov = (adv - mean_a) * (lp.detach() - mean_lp)
    cov[~mask] = float("-inf")
    cov[clipped] = float("-inf")
    n = max(int(hp.clip_cov_ratio * int(m.sum())), 1)
    idx = torch.nonzero((cov > hp.clip_cov_lb) & (cov < hp.clip_cov_ub) & mask)
    corr = torch.ones_like(adv)
    if len(idx):
        pick = idx[torch.randperm(len(idx), device=idx.device)[: min(n, len(idx))]]
        corr[pick[:, 0], pick[:, 1]] = 0
    loss_mat = torch.maximum(pg1, pg2) * corr
    return (loss_mat * m).sum() / norm.num_tokens


def reference_kl_cov(lp, old, adv, mask, hp, norm):
    """The reference algorithm: valid tokens copied to the host, top-k there."""
    m = mask.float()
    delta = lp - old
    ratio = torch.exp(delta)
    pg1 = -adv * ratio
    pg_kl = pg1 + hp.kl_cov_coef * delta.abs()
    pg = pg1.clone()
    valid_idx = torch.nonzero(mask)
    a = adv[mask].detach().reshape(-1).cpu()
    lpv = lp[mask].detach().reshape(-1).cpu()
    cov = (a - a.mean()) * (lpv - lpv.mean())
    k = max(1, int(len(cov) * hp.kl_cov_ratio))
    top = valid_idx[torch.topk(cov, k).indices.to(valid_idx.device)]
    pg[top[:, 0], top[:, 1]] = pg_kl[top[:, 0], top[:, 1]]
    return (pg * m).sum() / norm.num_tokens


def time_it(fn: Callable[[], None], device: str, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return min(out) * 1e3


def dtoh_copies(fn: Callable[[], None]) -> tuple[int, int]:
    """(count, bytes) of device-to-host memcpys during one call (CUDA only)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    count, nbytes = 0, 0
    for ev in prof.events():
        if "Memcpy DtoH" in ev.name or "Memcpy D2H" in ev.name:
            count += 1
            nbytes += int(getattr(ev, "device_memory_usage", 0) or 0)
    return count, nbytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2048, help="sequences (lengths uniform in 1..seq-len)")
    ap.add_argument("--seq-len", type=int, default=1024, help="response positions per sequence")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        run(args)
    finally:
        torch.set_num_threads(previous)
    return 0


def run(args: argparse.Namespace) -> None:
    lp0, old, adv, mask = make_batch(args.batch, args.seq_len, args.device, seed=0)
    norm = LossNormalizer.from_mask(mask)
    hp = algorithm_hparams(clip_ratio_low=1.0, clip_ratio_high=1.0)  # Clip-Cov recipe; cov ratios default
    rows: list[tuple[str, Callable]] = []
    for name in ("ppo", "clip_cov", "kl_cov"):
        fn = get_policy_loss(name)
        rows.append((f"megacov {name}", lambda lp, fn=fn: fn(lp, old, adv, mask, norm=norm, selected=None, hp=hp,
                                                               step=1)[0]))
    rows.append(("reference-style clip_cov", lambda lp: reference_clip_cov(lp, old, adv, mask, hp, norm)))
    rows.append(("reference-style kl_cov", lambda lp: reference_kl_cov(lp, old, adv, mask, hp, norm)))

    print(f"# {int(mask.sum()):,} valid tokens of {mask.numel():,} positions on {args.device}, "
          f"{args.threads} thread(s); best of {args.repeats}")
    header = f"{'loss':<26} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd ratio':>10} {'f+b ratio':>10}"
    if args.device == "cuda":
        header += f" {'DtoH copies':>12}"
    print(header)
    base = None
    for label, loss_fn in rows:
        def fwd(loss_fn: Callable = loss_fn) -> None:
            with torch.no_grad():
                loss_fn(lp0)

        def fwd_bwd(loss_fn: Callable = loss_fn) -> None:
            lp = lp0.clone().requires_grad_()
            loss_fn(lp).backward()

        t_f = time_it(fwd, args.device, args.warmup, args.repeats)
        t_fb = time_it(fwd_bwd, args.device, args.warmup, args.repeats)
        base = base or (t_f, t_fb)
        line = f"{label:<26} {t_f:>9.1f} {t_fb:>11.1f} {t_f / base[0]:>10.2f} {t_fb / base[1]:>10.2f}"
        if args.device == "cuda":
            line += f" {dtoh_copies(fwd_bwd)[0]:>12}"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
