"""Throughput and peak memory of ``megacov convert`` against a cold sequential read of the same files.

    python tools/bench_convert.py                          # Qwen2-shaped fp32 models of ~0.2, ~0.75, ~2.2 GB
    python tools/bench_convert.py --sizes small --tp 2     # hf-to-mcore with 2 writer processes
    python tools/bench_convert.py --keep                   # keep the generated models for another run

For each size a random Qwen2-shaped model is written under ``--workdir`` (``megacov.tiny.build_model``)
and each step runs in a fresh process, starting *cold*: the files it reads are written back and
dropped from the page cache first (``posix_fadvise(DONTNEED)`` on every file, which needs no
privileges and touches no one else's cache):

* ``cold read``   ``O_DIRECT`` sequential read of every safetensors shard in 16 MiB blocks, which
                  bypasses the page cache entirely: the disk's speed for these files, the baseline
                  the ``x cold read`` column divides by;
* ``write``       ``O_DIRECT`` sequential write of as many bytes to a new file on the same disk;
                  "read + write" adds the two: a conversion moves every byte in and out of one
                  disk, so where the disk does not serve reads and writes at once its best is
                  about that row's "x cold read";
* ``hf-to-mcore`` the streaming writer (one process per TP x PP rank): reads the HF shards, maps
                  and casts each write item, writes megatron's torch_dist files;
* ``mcore-to-hf`` layer by layer from the dist checkpoint into planned safetensors shards.

"seconds" is the conversion itself; "wall" adds the process and megatron start-up (imports, the
process group). Each step runs ``--repeat`` times (cold each time, the three steps in turn); the
table shows the median time and the largest memory of the runs. Outputs are
written as the converters write them: ``O_DIRECT`` where the file system allows it (so the bytes
are on disk when a step ends), no fsync in either direction.
Memory is Linux's exact high-water mark over the step (``VmHWM`` reset on entry,
:class:`megacov.rollout.memory.PeakRss`): "floor" is the RSS when the step starts, "over floor" what
the step itself added at its peak, also as a multiple of the largest tensor (the unit a streaming
converter holds; the read/convert/write overlap allows two in flight).
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
import json, mmap, os, sys, time
from megacov.rollout.memory import PeakRss
d = sys.argv[1]
files = sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors"))
block = mmap.mmap(-1, 16 << 20)  # page-aligned, as O_DIRECT requires
t = time.perf_counter()
total = 0
with PeakRss() as peak:
    for f in files:
        fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
        try:
            while True:
                got = os.readv(fd, [block])
                total += got
                if got < len(block):
                    break
        finally:
            os.close(fd)
sec = time.perf_counter() - t
print(json.dumps({"seconds": sec, "wall": sec, "bytes": total, "peak_rss_mb": peak.peak_bytes / 2**20,
                  "floor_mb": peak.start_bytes / 2**20}))
"""

_WRITE = """
import json, mmap, os, sys, time
from megacov.rollout.memory import PeakRss
path, total = sys.argv[1], int(sys.argv[2])
block = mmap.mmap(-1, 16 << 20)  # page-aligned, as O_DIRECT requires
block.write(os.urandom(len(block)))
t = time.perf_counter()
with PeakRss() as peak:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        done = 0
        while done < total:
            done += os.pwrite(fd, block, done)
    finally:
        os.close(fd)
sec = time.perf_counter() - t
os.unlink(path)
print(json.dumps({"seconds": sec, "wall": sec, "peak_rss_mb": peak.peak_bytes / 2**20,
                  "floor_mb": peak.start_bytes / 2**20}))
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
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - t
    return result


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


def _files(path: str) -> list[str]:
    return [os.path.join(root, f) for root, _, names in os.walk(path) for f in names]


def _weights_mb(path: str) -> float:
    return sum(os.path.getsize(f) for f in _files(path) if f.endswith(".safetensors")) / 2**20


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


def _evict(path: str) -> None:
    """Write back and drop every file under ``path`` from the page cache (this file set only)."""
    for f in _files(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _median_run(runs: list[dict]) -> dict:
    """The run with the median time, reporting the worst memory of all runs."""
    mid = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    worst = max(runs, key=lambda r: r["peak_rss_mb"] - r["floor_mb"])
    return dict(mid, peak_rss_mb=worst["peak_rss_mb"], floor_mb=worst["floor_mb"])


def bench(name: str, workdir: str, tp: int, pp: int, repeat: int) -> list[tuple]:
    hf = _model_dir(workdir, name)
    mb, largest = _weights_mb(hf), _largest_tensor_mb(hf)
    ckpt, back = os.path.join(workdir, f"{name}-mcore"), os.path.join(workdir, f"{name}-back")
    reads, writes, h2ms, m2hs = [], [], [], []
    for _ in range(repeat):  # each step in a fresh process, starting cold, in turn
        for d in (ckpt, back):
            shutil.rmtree(d, ignore_errors=True)
        _evict(hf)
        reads.append(_run(_READ, hf))
        writes.append(_run(_WRITE, os.path.join(workdir, "write-test.bin"), str(int(mb * 2**20))))
        _evict(hf)
        h2ms.append(_run(_H2M, hf, ckpt, str(tp), str(pp)))
        _evict(ckpt)
        m2hs.append(_run(_M2H, ckpt, back))
    read, write, h2m, m2h = _median_run(reads), _median_run(writes), _median_run(h2ms), _median_run(m2hs)
    rows = []
    for step, r in (("cold read (O_DIRECT)", read), ("write (O_DIRECT, same bytes)", write),
                    ("read + write, one after the other", {**read, "seconds": read["seconds"] + write["seconds"],
                                                           "wall": read["wall"] + write["wall"]}),
                    (f"hf-to-mcore tp{tp}pp{pp}", h2m), ("mcore-to-hf", m2h)):
        over = r["peak_rss_mb"] - r["floor_mb"]
        rows.append((name, mb, largest, step, r["seconds"], r["wall"], mb / r["seconds"],
                     read["seconds"] / r["seconds"], r["floor_mb"], over, over / largest))
    shutil.rmtree(back, ignore_errors=True)
    shutil.rmtree(ckpt, ignore_errors=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,medium,large",
                        help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--workdir", default="/tmp/megacov-bench-convert")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the generated HF models in --workdir")
    parser.add_argument("--repeat", type=int, default=3, help="runs per step: the median time is reported "
                        "(and its ratio to the median cold read), with the largest memory of all runs")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    header = ("model", "MB", "largest tensor MB", "step", "seconds", "wall s", "MB/s", "x cold read",
              "floor MB", "over floor MB", "over floor / largest tensor")
    rows = []
    start = time.perf_counter()
    print(f"# python {' '.join(sys.argv)}; free disk {shutil.disk_usage(args.workdir).free / 2**30:.0f} GiB",
          flush=True)
    try:
        for name in args.sizes.split(","):
            rows += bench(name.strip(), args.workdir, args.tp, args.pp, args.repeat)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r[0]} | {r[1]:.0f} | {r[2]:.0f} | {r[3]} | {r[4]:.2f} | {r[5]:.1f} | {r[6]:.0f} | "
              f"{r[7]:.2f} | {r[8]:.0f} | {r[9]:.0f} | {r[10]:.2f} |")
    print(f"(total {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
