"""``megacov verify sync``: do weights synced from the Megatron actor give vLLM the actor's log-probs?

The check a user runs on their own model and layout before trusting a training run: build the actor
at TP x PP from the HF directory, start the rollout engine(s) from the same directory, perturb every
actor weight (so that an engine which silently kept its old weights, or got q and v from different
versions, is caught), sync, and score the same token sequences with vLLM (prompt log-probs) and with
the actor (megatron's own forward). The largest absolute log-prob difference must stay below the
tolerance; the sync time, bytes moved and extra peak memory are printed beside it.

:class:`SyncCheckWorker` is the per-rank worker object (hosted by :class:`~megacov.workers.group.WorkerGroup`);
the tests use it too.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from megacov.rollout.sender import WeightSenderMixin


class SyncCheckWorker(WeightSenderMixin):
    """One Megatron rank holding the actor model: export, perturb and score (collective calls)."""

    def __init__(self, hf_dir: str, tp: int, pp: int, seed: int = 0, ep: int = 1):
        from megacov.models import build_model
        from megacov.parallel.layout import ParallelLayout

        self.layout = ParallelLayout.initialize(tp, pp, ep=ep, seed=seed)
        self.model, self.info = build_model(hf_dir, self.layout)

    def describe(self) -> str:
        return self.layout.describe()

    def perturb(self, scale: float, seed: int) -> None:
        """Add ``scale * std(param) * N(0, 1)`` noise to every weight, identical on TP replicas."""
        gen = torch.Generator()
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                split = bool(getattr(param, "tensor_model_parallel", False))
                tag = sum(map(ord, name)) + 7919 * self.info.layer_offset
                if "local_experts" in name:  # EP ranks number their experts from 0: offset them
                    tag += 104729 * self.info.expert_offset
                gen.manual_seed(seed * 1_000_003 + tag * 31 + (self.layout.tp_rank + 1 if split else 0))
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
                std = float(param.detach().float().std()) if param.numel() > 1 else 1.0
                param.add_((noise * scale * (std if std > 0 else 1.0)).to(param.dtype))

    def weight_source(self) -> Any:
        from megacov.rollout.source import MegatronSource

        return MegatronSource(self.model, self.layout, self.info)

    def hf_state(self) -> dict[str, torch.Tensor]:
        """The full HF state dict pieces this rank exports (copies; empty on non-exporting ranks)."""
        from megacov.models import iter_hf_weights

        return {n: t.detach().clone() for n, t in iter_hf_weights(self.model, self.layout, self.info)}

    def token_logprobs(self, sequences: Sequence[Sequence[int]], temperature: float = 1.0) -> list[list[float]] | None:
        """``log p(seq[i] | seq[:i])`` for i >= 1 (logits / temperature), on the rank that holds the logits.

        Sequences of different lengths are right-padded; causal attention keeps the padding out of
        the positions that are read back.
        """
        from megacov.models.forward import forward_logits

        width = max(len(s) for s in sequences)
        tokens = torch.zeros(len(sequences), width, dtype=torch.long)
        for i, seq in enumerate(sequences):
            tokens[i, :len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        logits = forward_logits(self.model, self.layout, self.info, tokens)
        if logits is None or self.layout.dp_rank != 0:
            return None
        logp = torch.log_softmax(logits.double() / temperature, dim=-1)
        picked = logp[:, :-1].gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
        return [picked[i, :len(seq) - 1].tolist() for i, seq in enumerate(sequences)]


def collect_logprobs(group: Any, sequences: Sequence[Sequence[int]], temperature: float = 1.0) -> list[list[float]]:
    """Run :meth:`SyncCheckWorker.token_logprobs` on every rank and return the one answer."""
    answers = [r for r in group.execute("token_logprobs", [list(s) for s in sequences], temperature) if r is not None]
    if len(answers) != 1:
        raise RuntimeError(f"expected exactly one rank to return log-probs, got {len(answers)}")
    return answers[0]


def export_hf_dir(group: Any, src_dir: str, out_dir: str) -> str:
    """Write the actor's current weights as an HF directory (config and tokenizer from ``src_dir``)."""
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}
    for part in group.execute("hf_state"):
        state.update(part)
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(src_dir):
        if name.endswith((".safetensors", ".safetensors.index.json", ".bin")):
            continue
        path = os.path.join(src_dir, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(out_dir, name))
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    return out_dir


def max_abs_delta(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> float:
    worst = 0.0
    for ra, rb in zip(a, b, strict=True):
        if len(ra) != len(rb):
            raise ValueError(f"log-prob rows of different lengths: {len(ra)} vs {len(rb)}")
        if ra:
            worst = max(worst, float((torch.tensor(ra, dtype=torch.float64) - torch.tensor(rb, dtype=torch.float64)).abs().max()))
    return worst


def random_sequences(vocab_size: int, count: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (count, length), generator=gen).tolist()


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", required=True, help="HF model directory (config.json, safetensors, tokenizer)")
    parser.add_argument("--tp", type=int, default=1, help="actor tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="actor pipeline-parallel size")
    parser.add_argument("--rollout-tp", type=int, default=1, help="tensor-parallel size of each vLLM engine")
    parser.add_argument("--engines", type=int, default=1, help="number of vLLM engines")
    parser.add_argument("--bucket-mb", type=float, default=None,
                        help="sync bucket size in MiB (default: rollout.sync_bucket_mb)")
    parser.add_argument("--transport", default="auto", help="auto, gloo, ipc or nccl (vLLM weight-transfer backend)")
    parser.add_argument("--noise", type=float, default=0.05,
                        help="relative std of the noise added to every actor weight before the sync")
    parser.add_argument("--sequences", type=int, default=8, help="token sequences scored on both sides")
    parser.add_argument("--length", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest accepted |log-prob delta|")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ray-address", default=None, help="Ray cluster (default: $RAY_ADDRESS or a local one)")


def _check_args(args: argparse.Namespace) -> str | None:
    if not os.path.isfile(os.path.join(args.hf, "config.json")):
        return f"--hf {args.hf}: no config.json there (expected a Hugging Face model directory)"
    for key in ("tp", "pp", "rollout_tp", "engines", "sequences"):
        if getattr(args, key) < 1:
            return f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}"
    if args.length < 2:
        return f"--length must be >= 2, got {args.length}"
    if args.bucket_mb is not None and args.bucket_mb <= 0:
        return f"--bucket-mb must be positive, got {args.bucket_mb}"
    return None


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2 ** 20:.2f} MiB"


def run(args: argparse.Namespace) -> int:
    from megacov.cli._common import fail
    from megacov.config.schema import MegacovConfig

    problem = _check_args(args)
    if problem:
        return fail(problem, 2)
    import ray

    from megacov.config.validate import plan_layout
    from megacov.runtime.core import Runtime

    cfg = MegacovConfig()
    cfg.model.path, cfg.rollout.tp, cfg.rollout.engines = os.path.abspath(args.hf), args.rollout_tp, args.engines
    cfg.parallel.tp, cfg.parallel.pp = args.tp, args.pp
    cfg.rollout.placement, cfg.rollout.sync_transport = "disaggregated", args.transport
    cfg.trainer.ray_address = args.ray_address
    if args.bucket_mb is not None:
        cfg.rollout.sync_bucket_mb = args.bucket_mb
    bucket_mb = cfg.rollout.sync_bucket_mb
    world = args.tp * args.pp
    started = not ray.is_initialized()
    temp_dir = _connect(args.ray_address, world + args.engines * args.rollout_tp)
    runtime = Runtime(cfg, plan_layout(cfg))
    try:
        t0 = time.perf_counter()
        runtime.connect()
        actor = runtime.start_group(SyncCheckWorker, (os.path.abspath(args.hf), args.tp, args.pp, args.seed))
        group = actor.group
        engines = runtime.start_engines(args.hf, max_model_len=max(cfg.data.max_prompt_len + cfg.rollout.max_response_len,
                                                                   args.length + 8))
        vocab = _vocab_of(args.hf)
        seqs = random_sequences(vocab, args.sequences, args.length, args.seed)
        before = max_abs_delta(engines.score(seqs), collect_logprobs(group, seqs))
        group.execute("perturb", args.noise, args.seed)
        reference = collect_logprobs(group, seqs)
        stale = max_abs_delta(engines.score(seqs), reference)
        report = runtime.sync()
        after = max_abs_delta(engines.score(seqs), reference)
        setup_s = time.perf_counter() - t0
    finally:
        runtime.close()
        if started:
            ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
    rows = [
        ("layout", f"actor TP={args.tp} PP={args.pp} -> {args.engines} engine(s) TP={args.rollout_tp}"),
        ("transport / bucket", (f"{report.transport} / {bucket_mb:g} MiB ({report.buckets} buckets, "
                               f"{report.oversized_buckets} oversized)")),
        ("sync time", f"{report.seconds * 1e3:.1f} ms"),
        ("bytes moved", f"{_mb(report.bytes)} x {report.engines} engine(s), {report.tensors} tensors"),
        ("exporter held peak", (f"{_mb(report.exporter_held_peak_bytes)} (largest fused group "
                               f"{_mb(report.largest_group_bytes)})")),
        ("extra peak RSS exporter / engine", f"{_mb(report.exporter_peak_extra_bytes)} / {_mb(report.engine_peak_extra_bytes)}"),
        ("max |dlogp| before perturbation", f"{before:.3e}"),
        ("max |dlogp| stale engine", f"{stale:.3e}"),
        ("max |dlogp| after sync", f"{after:.3e} (tolerance {args.tolerance:g})"),
        ("total wall time", f"{setup_s:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if stale <= args.tolerance:
        print(f"megacov: warning: the perturbation changed log-probs by only {stale:.2e}; a missed sync would "
              f"go unnoticed (raise --noise)", file=sys.stderr)
    ok = after <= args.tolerance and before <= args.tolerance
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def _connect(address: str | None, slots: int) -> str | None:
    """Join the given cluster, or start a private local one (own temp dir) with a CPU per slot.

    A local cluster is started with ``address="local"`` and its own temp dir: Ray would otherwise join
    whatever cluster was last started on this host (its address is recorded under /tmp/ray).
    Returns the temp dir to remove afterwards (None when joining a cluster).
    """
    import tempfile

    import ray

    from megacov.workers.cluster import connect_ray, resolve_address

    if ray.is_initialized():
        return None
    if resolve_address(address) is not None:
        connect_ray(address)
        return None
    temp_dir = tempfile.mkdtemp(prefix="megacov-ray-", dir="/tmp")
    ray.init(address="local", num_cpus=max(slots, os.cpu_count() or 1), include_dashboard=False,
             namespace="megacov", _temp_dir=temp_dir, configure_logging=False)
    return temp_dir


def _vocab_of(hf_dir: str) -> int:
    import json

    with open(os.path.join(hf_dir, "config.json")) as fh:
        return int(json.load(fh)["vocab_size"])
