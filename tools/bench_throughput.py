"""Throughput of the update phase on a long-tailed length distribution: padding and DP balance.

Prints, in one run:
  1. padding fraction of the padded [B, L] batch vs packed micro-batches;
  2. per-DP-rank token imbalance (max / mean) of contiguous shares vs token-balanced shares;
  3. update-phase time (one ``train_step`` of the tiny model on CPU) padded vs token-budget + packed,
     both measured here, median of ``--repeats``;
  4. RL step time sync vs async (``trainer.async_rollout``): two short runs of the tiny task with real
     Ray, vLLM and Megatron, one after the other in this process, with response lengths as the
     random tiny model draws them (EOS at random, many up to the cap; the table prints mean and max);
     plus the fraction of each step the engines and the actor sit idle (from the loop's own busy
     times), which shows the overlap even where the cores are too few for a speed-up.
     ``--rl-steps 0`` skips it.

    PYTHONPATH=$PWD python tools/bench_throughput.py [--seqs 64 --dp 4 --max-len 4096 --rl-steps 6]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from megacov.parallel.batch import ActorBatch
from megacov.parallel.partition import balanced_partition, imbalance


def long_tailed_lengths(n: int, max_len: int, seed: int) -> list[tuple[int, int]]:
    """(prompt, response) lengths: short prompts, log-normal responses with a heavy tail, capped."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(8, 32, (n,), generator=g)
    resp = torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 1.0 + torch.log(torch.tensor(max_len / 12.0)))
    return [(int(p), int(min(max(int(r), 2), max_len - int(p)))) for p, r in zip(prompts, resp)]


def synthetic_batch(lengths: list[tuple[int, int]], vocab: int, seed: int) -> ActorBatch:
    b = len(lengths)
    L = max(p + r for p, r in lengths)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, L), generator=g)
    mask = torch.zeros(b, L, dtype=torch.bool)
    for i, (p, r) in enumerate(lengths):
        mask[i, p:p + r] = True
        ids[i, p + r:] = 0
    adv = torch.randn(b, 1, generator=g).expand(b, L) * mask
    return ActorBatch(input_ids=ids, position_ids=torch.arange(L).expand(b, L).clone(), response_mask=mask,
                      old_log_prob=-2.0 * mask.float(), advantages=adv.float().contiguous(),
                      global_seq_ids=torch.arange(b), seq_len=L)


def layout_stats(batch: ActorBatch, dp: int) -> dict[str, float]:
    tokens = batch.token_counts.tolist()
    padded = batch.batch_size * batch.seq_len
    contiguous = [int(batch.shard(r, dp).token_counts.sum()) for r in range(dp)]
    balanced = [sum(tokens[i] for i in g) for g in balanced_partition(tokens, dp)]
    return {"pad_before": 1 - sum(tokens) / padded, "pad_after": 0.0,
            "imb_before": imbalance(contiguous), "imb_after": imbalance(balanced)}


def _time_updates(rank: int, world: int, batch: ActorBatch, repeats: int, mbs: int, max_tokens: int) -> dict[str, Any]:
    from megacov.parallel.actor import train_step
    from megacov.parallel.layout import ParallelLayout
    from megacov.verify import exactness as ex

    torch.set_num_threads(1)
    spec = ex.TinySpec(vocab=67)
    w = ex.full_weights(spec, 0)
    layout = ParallelLayout.initialize(1, 1, seed=0)
    try:
        model, _ = ex._build(spec, layout, ex.RunOptions(), batch.seq_len, w)
        hp = ex.case_hparams(ex.Case(loss="clip_cov", micro_batches=1))
        variants = {"padded": dict(micro_batch_size=mbs),
                    "packed": dict(micro_batch_size=mbs, max_tokens_per_micro_batch=max_tokens, pack=True)}
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(repeats):
            for name, kw in variants.items():
                for p in model.parameters():
                    p.grad = None
                t0 = time.perf_counter()
                train_step([model], layout, batch, algo_cfg=hp, step=1, temperature=1.0,
                           real_vocab_size=spec.vocab, **kw)
                times[name].append(time.perf_counter() - t0)
        return {k: statistics.median(v) for k, v in times.items()}
    finally:
        layout.destroy()


def rl_runs(steps: int, max_len: int, root: str) -> dict[str, dict[str, float]]:
    """Sync and async runs of the tiny task; per mode the mean over steps 2.. (step 1 holds the
    first weight-transfer rendezvous) of the step time, the idle fractions and the actor's wait."""
    import os

    from megacov.config import load_config
    from megacov.config.validate import validate
    from megacov.tiny import build_example
    from megacov.trainer import train
    from megacov.trainer.metrics import read_jsonl

    paths = build_example(os.path.join(root, "model"), os.path.join(root, "data"))
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples/tiny/config.yaml")
    out = {}
    for mode in ("sync", "async"):
        cfg = load_config(config, [
            f"model.path={paths['model']}", f"data.train_files=[{paths['train']}]", "data.eval_files=[]",
            "data.sft_files=[]", f"trainer.output_dir={root}/runs", f"trainer.name={mode}", "trainer.sft_steps=0",
            f"trainer.total_steps={steps}", "trainer.eval_every=0", "checkpoint.save_every=0",
            "checkpoint.export_hf=false", "logging.plot=false", "logging.tensorboard=false",
            "logging.progress_bar=false", "parallel.tp=1", "rollout.placement=disaggregated", "data.batch_size=8",
            "data.mini_batch_size=4", "rollout.n=4", "parallel.micro_batch_size=4",
            f"rollout.max_response_len={max_len}", f"trainer.async_rollout={mode == 'async'}"])
        assert train(cfg, validate(cfg)) == 0
        rows = [r for r in read_jsonl(os.path.join(root, "runs", mode, "metrics.jsonl")) if r["step"] >= 2]
        keys = ("time/step", "perf/engine_idle_frac", "perf/actor_idle_frac", "time/rollout", "time/engine_busy",
                "time/actor_busy", "response/len_mean", "response/len_max", "rollout/staleness")
        out[mode] = {k: statistics.fmean(r[k] for r in rows) for k in keys}
    return out


def print_rl(rl: dict[str, dict[str, float]], steps: int, max_len: int) -> None:
    s, a = rl["sync"], rl["async"]
    print(f"RL steps: tiny model, CPU, {steps} steps per mode (mean of steps 2..{steps}), 8 prompts x 4, "
          f"max_response_len={max_len}, response length mean {s['response/len_mean']:.1f} / "
          f"{a['response/len_mean']:.1f}, max {s['response/len_max']:.0f} / {a['response/len_max']:.0f} (sync / async)")
    print(f"{'metric':<34} {'sync':>9} {'async':>9} {'ratio':>7}")
    for key, label in (("time/step", "step time (s)"), ("time/rollout", "actor waits for rollout (s)"),
                       ("time/engine_busy", "engines generating (s)"), ("time/actor_busy", "actor busy (s)"),
                       ("perf/engine_idle_frac", "engine-idle fraction"), ("perf/actor_idle_frac", "actor-idle fraction"),
                       ("rollout/staleness", "staleness (updates)")):
        ratio = f"{s[key] / a[key]:>6.2f}x" if key == "time/step" and a[key] > 0 else ""
        print(f"{label:<34} {s[key]:>9.3f} {a[key]:>9.3f} {ratio:>7}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=64, help="sequences in the RL batch (layout figures)")
    parser.add_argument("--dp", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--update-seqs", type=int, default=16, help="sequences of the timed update")
    parser.add_argument("--update-max-len", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=4, help="sequences per padded micro-batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rl-steps", type=int, default=6, help="steps of each sync / async run (0: skip them)")
    parser.add_argument("--rl-max-len", type=int, default=48, help="max_response_len of the sync / async runs")
    args = parser.parse_args()
    from megacov.parallel.spawn import run_distributed

    big = synthetic_batch(long_tailed_lengths(args.seqs, args.max_len, args.seed), 67, args.seed)
    s = layout_stats(big, args.dp)
    print(f"layout: {args.seqs} sequences, L={big.seq_len}, {int(big.token_counts.sum())} tokens, DP={args.dp}")
    print(f"{'metric':<34} {'before':>9} {'after':>9} {'ratio':>7}")
    print(f"{'padding fraction (pad / computed)':<34} {s['pad_before']:>9.3f} {s['pad_after']:>9.3f} {'':>7}")
    print(f"{'DP token imbalance (max / mean)':<34} {s['imb_before']:>9.3f} {s['imb_after']:>9.3f} "
          f"{s['imb_before'] / s['imb_after']:>6.2f}x")
    small = synthetic_batch(long_tailed_lengths(args.update_seqs, args.update_max_len, args.seed), 67, args.seed)
    # the same number of micro-batches as the padded run, without the padding
    n_micro = -(-small.batch_size // args.micro_batch_size)
    budget = max(int(small.token_counts.max()), -(-int(small.token_counts.sum()) // n_micro))
    t = run_distributed(_time_updates, 1, small, args.repeats, args.micro_batch_size, budget, timeout_s=600)[0]
    pad = 1 - int(small.token_counts.sum()) / (small.batch_size * small.seq_len)
    print(f"update: tiny model, CPU, {small.batch_size} sequences, L={small.seq_len}, padding {pad:.3f}; "
          f"padded = {args.micro_batch_size} sequences per micro-batch, packed = {budget}-token budget")
    print(f"{'update-phase time (s, median)':<34} {t['padded']:>9.3f} {t['packed']:>9.3f} "
          f"{t['padded'] / t['packed']:>6.2f}x")
    if args.rl_steps >= 2:
        import tempfile

        with tempfile.TemporaryDirectory() as root:
            print_rl(rl_runs(args.rl_steps, args.rl_max_len, root), args.rl_steps, args.rl_max_len)


if __name__ == "__main__":
    main()
