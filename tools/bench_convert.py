"""Throughput and peak memory of ``megacov convert`` against simply reading the safetensors files.

    python tools/bench_convert.py                       # Qwen2-shaped models of ~220 MB and ~790 MB (fp32)
    python tools/bench_convert.py --sizes small --tp 2  # hf-to-mcore with 2 writer processes

For each size a random Qwen2-shaped model is written locally (``megacov.tiny.build_model``), its files
are read once to warm the page cache, then each step runs in a fresh process so its peak RSS is its
own:

* ``read``        plain ``read()`` of every shard into memory: the baseline the ratios refer to (any
                  converter has to read every byte at least once);
* ``hf-to-mcore`` the streaming writer (one process per TP x PP rank; its time excludes process start);
* ``mcore-to-hf`` layer by layer from the dist checkpoint into planned safetensors shards.

Memory is Linux's exact high-water mark over the step (``VmHWM`` reset on entry,
:class:`megacov.rollout.memory.PeakRss`): "floor" is the RSS when the step starts (interpreter, torch
and, for hf-to-mcore, megatron), "over floor" what the step itself added at its peak. A streaming step
holds a few tensors, not the model: its "over floor" is a small multiple of the largest tensor (the
embedding or LM head; DCP's reader and writer each keep one or two copies of the item in flight) and
does not grow with the number of layers, while ``read`` necessarily holds everything.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

SIZES = {
    # name: (hidden, layers, heads, kv_heads, ffn, vocab)
    "small": (512, 8, 8, 2, 1408, 32000),
    "medium": (1024, 12, 16, 2, 2816, 32000),
    "large": (1536, 16, 12, 2, 4096, 64000),
}

_READ = """
import json, os, sys, time
from megacov.rollout.memory import PeakRss
d = sys.argv[1]
files = sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors"))
t = time.perf_counter()
with PeakRss() as peak:
    data = [open(f, "rb").read() for f in files]
sec = time.perf_counter() - t
print(json.dumps({"seconds": sec, "peak_rss_mb": peak.peak_bytes / 2**20, "floor_mb": peak.start_bytes / 2**20}))
"""

_H2M = """
import json, sys, time
from megacov.models.checkpoint import hf_to_mcore
t = time.perf_counter()
stats = hf_to_mcore(sys.argv[1], sys.argv[2], tp=int(sys.argv[3]), pp=int(sys.argv[4]), progress=False)
ranks = stats["ranks"]
worst = max(ranks, key=lambda r: r["peak_rss_mb"] - r["rss_at_start_mb"])
print(json.dumps({"seconds": max(r["save_seconds"] for r in ranks), "wall": time.perf_counter() - t,
                  "peak_rss_mb": worst["peak_rss_mb"], "floor_mb": worst["rss_at_start_mb"]}))
"""

_M2H = """
import json, sys, time
from megacov.models.checkpoint import mcore_to_hf
t = time.perf_counter()
stats = mcore_to_hf(sys.argv[1], sys.argv[2], progress=False)
print(json.dumps({"seconds": stats["seconds"], "wall": time.perf_counter() - t, "peak_rss_mb": stats["peak_rss_mb"],
                  "floor_mb": stats["rss_at_start_mb"]}))
"""


def _run(code: str, *args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _model_dir(workdir: str, name: str) -> str:
    from megacov.tiny import build_model

    hidden, layers, heads, kv, ffn, vocab = SIZES[name]
    path = os.path.join(workdir, f"qwen2-{name}")
    if not os.path.isfile(os.path.join(path, "model.safetensors")) and not os.path.isfile(
            os.path.join(path, "model.safetensors.index.json")):
        shutil.rmtree(path, ignore_errors=True)
        build_model(path, architecture="qwen2", hidden_size=hidden, num_layers=layers, num_heads=heads,
                    num_kv_heads=kv, intermediate_size=ffn, vocab_size=vocab)
    return path


def _weights_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")) / 2**20


def _largest_tensor_mb(path: str) -> float:
    from megacov.models.hf_io import SafetensorsReader

    reader = SafetensorsReader(path)
    sizes = []
    for name in reader.weight_map:
        t = reader[name]
        n = 1
        for d in t.shape:
            n *= d
        sizes.append(n * t.dtype.itemsize)
    reader.close()
    return max(sizes) / 2**20


def _warm(path: str) -> None:
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            with open(os.path.join(path, f), "rb") as fh:
                while fh.read(1 << 24):
                    pass


def bench(name: str, workdir: str, tp: int, pp: int) -> list[tuple]:
    hf = _model_dir(workdir, name)
    mb, largest = _weights_mb(hf), _largest_tensor_mb(hf)
    ckpt, back = os.path.join(workdir, f"{name}-mcore"), os.path.join(workdir, f"{name}-back")
    for d in (ckpt, back):
        shutil.rmtree(d, ignore_errors=True)
    _warm(hf)
    read = _run(_READ, hf)
    h2m = _run(_H2M, hf, ckpt, str(tp), str(pp))
    _warm(ckpt)
    m2h = _run(_M2H, ckpt, back)
    rows = []
    for step, r in (("read", read), (f"hf-to-mcore tp{tp}pp{pp}", h2m), ("mcore-to-hf", m2h)):
        over = r["peak_rss_mb"] - r["floor_mb"]
        rows.append((name, mb, largest, step, r["seconds"], mb / r["seconds"], r["seconds"] / read["seconds"],
                     r["floor_mb"], over, over / mb, over / largest))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,medium", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--workdir", default="/tmp/megacov-bench-convert")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    header = ("model", "MB", "largest tensor MB", "step", "seconds", "MB/s", "x read", "floor MB",
              "over floor MB", "over floor / model", "over floor / largest tensor")
    rows = []
    start = time.perf_counter()
    for name in args.sizes.split(","):
        rows += bench(name.strip(), args.workdir, args.tp, args.pp)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r[0]} | {r[1]:.0f} | {r[2]:.0f} | {r[3]} | {r[4]:.2f} | {r[5]:.0f} | {r[6]:.2f} | {r[7]:.0f} | "
              f"{r[8]:.0f} | {r[9]:.2f} | {r[10]:.1f} |")
    print(f"(total {time.perf_counter() - start:.0f} s; times exclude interpreter/megatron start-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
