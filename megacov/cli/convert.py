"""``megacov convert hf-to-mcore | mcore-to-hf``: checkpoints between Hugging Face and megatron.

The work is in :mod:`megacov.models.checkpoint`; this module parses arguments, turns bad input into
one line and exit code 2 (a failure while writing, such as a full disk, into one line and exit code
1), creates the output's parent folders, and makes SIGTERM / SIGINT remove the partial
``<out>.tmp-*`` folder (and removes ones that a killed conversion left behind).
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import sys
from typing import Any

from megacov.cli._common import fail


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    h2m = sub.add_parser("hf-to-mcore", help="HF safetensors -> megatron dist checkpoint (loads at any TP x PP)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    h2m.add_argument("--hf", required=True, metavar="DIR", help="HF model directory")
    h2m.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory")
    h2m.add_argument("--tp", type=int, default=1, help="tensor-parallel processes used to convert")
    h2m.add_argument("--pp", type=int, default=1, help="pipeline-parallel processes used to convert")
    h2m.add_argument("--ep", type=int, default=1, help="expert-parallel processes used to convert (MoE models)")
    h2m.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="stored dtype (default: the HF config's)")
    m2h = sub.add_parser("mcore-to-hf", help="megatron dist checkpoint -> HF safetensors + config + tokenizer",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m2h.add_argument("--mcore", required=True, metavar="DIR", help="checkpoint from hf-to-mcore (or training)")
    m2h.add_argument("--out", required=True, metavar="DIR", help="output HF directory")
    m2h.add_argument("--hf", metavar="DIR", help="HF model the checkpoint derives from: its config and tokenizer "
                     "describe a checkpoint without megacov.json (a training checkpoint's actor/ folder)")
    m2h.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="output dtype (default: as stored)")
    m2h.add_argument("--max-shard-size-mb", type=int, default=None, help="safetensors shard size (default 2048)")
    for p in (h2m, m2h):
        p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
        p.add_argument("--quiet", action="store_true", help="no progress bars")


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so the temp folder's cleanup runs."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def _remove_stale_temps(out: str) -> None:
    """``<out>.tmp-*`` / ``<out>.old-*`` left by a conversion killed with SIGKILL (or a power cut)."""
    out = os.path.abspath(out.rstrip("/"))
    for path in glob.glob(glob.escape(out) + ".tmp-*") + glob.glob(glob.escape(out) + ".old-*"):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            print(f"removed {path} (left by an interrupted conversion)", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from megacov.models.family import UnsupportedModelError
    from megacov.models.hf_io import CheckpointError
    from megacov.models.mapping import MappingError

    parent = os.path.dirname(os.path.abspath(args.out.rstrip("/")))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        return fail(f"cannot create the output's folder {parent}: {exc.strerror}")
    _remove_stale_temps(args.out)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _convert(args)
    except (CheckpointError, UnsupportedModelError, MappingError) as exc:
        return fail(str(exc), 2)
    except (_Terminated, KeyboardInterrupt):
        return fail(f"interrupted; nothing was written to {args.out}", 143)
    except OSError as exc:  # a full disk, a permission error: the temp folder is already removed
        return fail(f"conversion failed while writing {args.out}: {exc}", 1)
    except RuntimeError as exc:  # a conversion rank failed; its traceback is in the text
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        return fail(f"conversion failed, nothing was written to {args.out}: {lines[-1].strip() if lines else exc}", 1)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _convert(args: argparse.Namespace) -> int:
    from megacov.models import checkpoint

    if args.direction == "hf-to-mcore":
        if args.tp < 1 or args.pp < 1 or args.ep < 1:
            return fail("--tp, --pp and --ep must be >= 1")
        stats = checkpoint.hf_to_mcore(args.hf, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype,
                                       overwrite=args.overwrite, progress=not args.quiet, ep=args.ep)
        extra = f"{args.tp * args.pp * args.ep} process(es), {_rss(stats['ranks'])}"
    else:
        shard_mb = args.max_shard_size_mb or checkpoint.DEFAULT_MAX_SHARD_MB
        if shard_mb < 1:
            return fail("--max-shard-size-mb must be >= 1")
        stats = checkpoint.mcore_to_hf(args.mcore, args.out, dtype=args.dtype, overwrite=args.overwrite,
                                       max_shard_mb=shard_mb, progress=not args.quiet, hf_dir=args.hf)
        extra = _rss([stats])
    mb = stats["hf_bytes"] / 2**20
    print(f"wrote {args.out}: {mb:.1f} MB of weights in {stats['seconds']:.1f} s "
          f"({mb / max(stats['seconds'], 1e-9):.1f} MB/s), {extra}")
    return 0


def _rss(stats: list) -> str:
    """Peak resident memory of the conversion over what the process held before it (Linux only)."""
    extra = [r["peak_rss_mb"] - r["rss_at_start_mb"] for r in stats if r.get("peak_rss_mb") is not None]
    return f"peak memory +{max(extra):.0f} MB per process" if extra else "peak memory not measurable here"
