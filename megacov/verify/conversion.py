"""``megacov verify conversion``: transformers and megatron logits on the same random tokens.

The megatron side is built exactly as training builds it (:func:`megacov.models.build_model` at the
requested TP x PP, from the HF directory or from a converted mcore checkpoint) and run through
megatron's pipeline schedule; the HF side is ``AutoModelForCausalLM``. A conversion bug (a
mis-interleaved QKV, a swapped gate/up, a wrong RoPE base) shows up as an O(1) difference, far
above the fp32 rounding noise (~1e-6) of a correct one. In bf16 the two implementations round
differently, so the default tolerance is measured: :data:`BF16_NOISE_FACTOR` times the difference
between the HF model's own bf16 and fp32 logits on the same tokens.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from megacov.models.arch import check_layout, torch_dtype
from megacov.models.family import UnsupportedModelError
from megacov.models.hf_io import CheckpointError
from megacov.models.loader import check_hf_weights, read_mcore_meta, resolve_source
from megacov.models.mapping import MappingError


#: fp32 tolerance of the max-abs logit difference.
FP32_TOL = 1e-4
#: bf16 tolerance, as a multiple of the HF model's own bf16-vs-fp32 max-abs logit difference.
BF16_NOISE_FACTOR = 4.0


def _verify_rank(rank: int, world_size: int, path: str, tp: int, pp: int, tokens: torch.Tensor, dtype: str
                 ) -> torch.Tensor | None:
    from megacov.models.forward import forward_logits
    from megacov.models.loader import build_model
    from megacov.parallel.layout import ParallelLayout

    layout = ParallelLayout.initialize(tp, pp)
    try:
        model, info = build_model(path, layout, dtype=dtype)
        return forward_logits(model, layout, info, tokens)
    finally:
        layout.destroy()


def hf_logits(hf_dir: str, tokens: torch.Tensor, dtype: Any = "fp32") -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch_dtype(dtype)).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def verify_conversion(hf_dir: str, *, mcore_dir: str | None = None, tp: int = 1, pp: int = 1,
                      tol: float | None = None, batch: int = 2, seq_len: int = 32, seed: int = 0,
                      dtype: str = "fp32") -> dict:
    """Compare logits; returns ``max_abs``, ``mean_abs``, ``ok`` (max_abs <= tol) and the setup."""
    from megacov.parallel.spawn import run_distributed

    hf_src = resolve_source(hf_dir, tp=tp)
    check_hf_weights(hf_dir, hf_src.arch)
    path = hf_dir
    if mcore_dir is not None:
        read_mcore_meta(mcore_dir)  # an HF directory here would silently compare HF with itself
        mc = resolve_source(mcore_dir, tp=tp)
        if (mc.arch.family, mc.arch.vocab_size, mc.arch.num_layers) != (
                hf_src.arch.family, hf_src.arch.vocab_size, hf_src.arch.num_layers):
            raise CheckpointError(f"{mcore_dir} holds a {mc.arch.family} model with {mc.arch.num_layers} layers "
                                  f"and vocabulary {mc.arch.vocab_size}; {hf_dir} does not match it")
        check_layout(mc.arch, tp, pp)
        path = mcore_dir
    check_layout(hf_src.arch, tp, pp)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, hf_src.arch.vocab_size, (batch, seq_len), generator=gen)
    reference = hf_logits(hf_dir, tokens, dtype)
    if tol is None:
        tol = FP32_TOL
        if dtype != "fp32":  # what rounding alone does to this model's logits, times a margin
            own_noise = float((reference - hf_logits(hf_dir, tokens, "fp32")).abs().max())
            tol = max(FP32_TOL, BF16_NOISE_FACTOR * own_noise)
    outputs = run_distributed(_verify_rank, tp * pp, path, tp, pp, tokens, dtype)
    logits = next(o for o in outputs if o is not None)
    diff = (logits - reference).abs()
    max_abs, mean_abs = float(diff.max()), float(diff.mean())
    return {"max_abs": max_abs, "mean_abs": mean_abs, "tol": tol, "ok": max_abs <= tol, "tp": tp, "pp": pp,
            "source": "mcore" if mcore_dir else "hf", "tokens": tuple(tokens.shape), "family": hf_src.arch.family}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", required=True, metavar="DIR", help="HF model directory (the reference)")
    parser.add_argument("--mcore", metavar="DIR", help="megacov mcore checkpoint to compare (default: build the "
                        "megatron model from --hf)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the megatron side")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the megatron side")
    parser.add_argument("--tol", type=float, default=None,
                        help=f"max-abs logit difference allowed (default: {FP32_TOL:g} in fp32; in bf16 "
                             f"{BF16_NOISE_FACTOR:g}x the HF model's own bf16-vs-fp32 difference)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of both models")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from megacov.cli._common import fail

    if args.tp < 1 or args.pp < 1:
        return fail("--tp and --pp must be >= 1")
    try:
        res = verify_conversion(args.hf, mcore_dir=args.mcore, tp=args.tp, pp=args.pp, tol=args.tol,
                                batch=args.batch, seq_len=args.seq_len, seed=args.seed, dtype=args.dtype)
    except (CheckpointError, UnsupportedModelError, MappingError) as exc:
        return fail(str(exc), 2)
    print(f"{res['family']} {res['source']} tp={res['tp']} pp={res['pp']} tokens={res['tokens'][0]}x{res['tokens'][1]}"
          f"  logits max-abs {res['max_abs']:.3e}  mean-abs {res['mean_abs']:.3e}  (tol {res['tol']:.1e})")
    if not res["ok"]:
        print("megacov: conversion check FAILED: max-abs difference above tolerance")
        return 1
    print("conversion OK")
    return 0
