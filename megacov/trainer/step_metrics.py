"""The per-step numbers: rollout statistics, the actor's update metrics combined over mini-batches,
KL to the reference, the train/rollout mismatch and the timing breakdown.

Names are the ones ``megacov analyze`` and the plot read (see the module docstring of
:mod:`megacov.trainer.loop`). The statistics of the selected tokens (``cov/selected_mean``,
``high_entropy/*``) are computed on the ranks, with the scope each mini-batch was selected in;
here they are only combined over mini-batches.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from megacov.algorithms.kl import kl_estimate
from megacov.trainer.batching import masked_mean
from megacov.trainer.rollout import Rollout

_RENAME = {"pg_loss": "actor/pg_loss", "clipfrac": "actor/clipfrac", "ppo_kl": "actor/ppo_kl",
           "grad_norm": "actor/grad_norm", "kl_loss": "actor/kl_loss", "entropy": "actor/entropy_update",
           "num_selected": "cov/num_selected", "entropy_bonus": "actor/entropy_bonus",
           "total_loss": "actor/loss"}
#: Update metrics that add up over mini-batches (the rest are averaged).
_SUMMED = ("num_selected", "num_tokens", "num_seqs", "high_entropy/num_selected", "prepass_forwards")
#: Means over selected tokens, weighted by the count of each optimiser step (mean key -> count key).
_COUNT_WEIGHTED = {"cov/selected_mean": "num_selected", "high_entropy/entropy_mean": "high_entropy/num_selected"}
#: Timing phases; "other" is the step time none of them covers.
PHASES = ("rollout", "reward", "logprob", "update", "sync")


def rollout_metrics(ro: Rollout, max_len: int) -> dict[str, float]:
    scores, correct = ro.array("scores"), ro.array("correct")
    lengths = np.array([len(r) for r in ro.flat("response_ids")], dtype=np.float64)
    return {
        "reward/mean": float(scores.mean()), "reward/std": float(scores.std()),
        "reward/acc": float(correct.mean()), "reward/raw_mean": float(ro.array("raw").mean()),
        # full credit (raw >= 1), apart from "correct" for graded rewards such as the explore task's
        "reward/full": float((ro.array("raw") >= 1.0).mean()),
        "response/len_mean": float(lengths.mean()), "response/len_max": float(lengths.max()),
        "response/clip_frac": float(np.mean(ro.flat("truncated"))),
        "batch/informative_groups": float(np.mean([g.informative for g in ro.groups])),
        **ro.stats,
    }


def update_metrics(outs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Combine the per-optimiser-step metrics of one RL step (sum counts, max maxima, mean the rest)."""
    out: dict[str, float] = {}
    keys = {k for o in outs for k, v in o.items() if isinstance(v, (int, float))}
    for key in sorted(keys):
        vals = [float(o[key]) for o in outs if isinstance(o.get(key), (int, float))]
        if key in _SUMMED:
            value = float(sum(vals))
        elif key == "cov/max":
            value = max(vals)
        elif key in ("cov/min", "high_entropy/threshold"):
            value = min(vals)
        elif key == "lr":
            value = vals[-1]
        elif key in _COUNT_WEIGHTED:
            pairs = [(float(o[key]), float(o.get(_COUNT_WEIGHTED[key], 0))) for o in outs
                     if isinstance(o.get(key), (int, float))]
            total = sum(c for _, c in pairs)
            value = sum(v * c for v, c in pairs) / total if total else float("nan")
        elif key == "grad_norm":
            finite = [v for v in vals if math.isfinite(v)]
            value = float(np.mean(finite)) if finite else float("nan")
        else:
            value = float(np.mean(vals))
        out[_RENAME.get(key, key if "/" in key else f"actor/{key}")] = value
    if outs and "ppo_kl" in outs[0]:
        # On-policy the first update recomputes exactly the old log-probs: this must read 0.0.
        out["actor/ppo_kl_first_update"] = float(outs[0]["ppo_kl"])
    out["actor/skipped_updates"] = float(sum(1 for o in outs if not o.get("applied", 1.0)))
    out["actor/updates"] = float(len(outs))
    out.pop("actor/applied", None)
    return out


def kl_to_ref(old_lp: torch.Tensor, ref_lp: torch.Tensor, mask: torch.Tensor, estimator: str) -> float:
    return masked_mean(kl_estimate(old_lp.double(), ref_lp.double(), mask, estimator), mask)


def timing_metrics(seconds: dict[str, float], step_s: float, tokens: int, generated: int,
                   engine_s: float = 0.0) -> dict[str, float]:
    """Phase times of the step and the throughput; ``engine_s`` (seconds the engines spent generating
    during the step) gives the idle fractions that show how far an async rollout overlaps."""
    out = {f"time/{p}": seconds.get(p, 0.0) for p in PHASES}
    covered = sum(out.values())
    out["time/eval"] = seconds.get("eval", 0.0)
    out["time/checkpoint"] = seconds.get("checkpoint", 0.0)
    out["time/step"] = step_s - out["time/eval"] - out["time/checkpoint"]
    out["time/other"] = max(0.0, out["time/step"] - covered)
    out["time/other_frac"] = out["time/other"] / out["time/step"] if out["time/step"] > 0 else 0.0
    out["perf/tokens_per_s"] = tokens / out["time/step"] if out["time/step"] > 0 else 0.0
    out["perf/rollout_tokens_per_s"] = generated / out["time/rollout"] if out["time/rollout"] > 0 else 0.0
    out["time/engine_busy"] = engine_s
    out["time/actor_busy"] = out["time/logprob"] + out["time/update"]
    for who in ("engine", "actor"):
        busy = out[f"time/{who}_busy"] / out["time/step"] if out["time/step"] > 0 else 0.0
        out[f"perf/{who}_idle_frac"] = max(0.0, 1.0 - busy)
    return out
