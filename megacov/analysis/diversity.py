"""Per-step diversity of the rollouts: is the policy still exploring, or has it collapsed?

Mean token entropy alone cannot tell a policy that keeps several good answers per prompt from one
that is unsure where it should not be. These numbers, logged every step, can:

* ``div/distinct`` / ``div/distinct_rewarded`` / ``div/distinct_correct``: distinct response texts per
  prompt among all n samples, among those with a positive raw reward, and among the correct ones
  (averaged over the step's prompts). Collapse shows as these falling towards 1.
* ``div/pass@n`` next to ``div/avg@n``: the share of prompts with at least one correct sample, and the
  mean correctness. A gap between them is exploration that still finds answers the average misses.
* ``div/rewarded_rate``: the share of samples with any positive reward (partial credit included).
* ``entropy/pos_<i>``: mean token entropy at response position i (0 = first response token), for the
  first ``max_positions`` positions; a collapse usually starts at some positions and not others.

Pure functions of what the loop already holds (no I/O, no distributed calls).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:  # torch stays out of ``import megacov.analysis`` (see the package docstring)
    import torch


def group_diversity(texts: Sequence[str], raw: np.ndarray, correct: np.ndarray, n: int) -> dict[str, float]:
    """Distinct answers per prompt, pass@n and avg@n over groups of ``n`` consecutive samples."""
    raw = np.asarray(raw, dtype=np.float64).reshape(-1)
    correct = np.asarray(correct, dtype=bool).reshape(-1)
    if n < 1 or len(texts) != raw.size or raw.size != correct.size or raw.size % n:
        raise ValueError(f"{len(texts)} texts, {raw.size} rewards, {correct.size} flags: not whole groups of {n}")
    groups = raw.size // n
    if groups == 0:
        return {}
    distinct, rewarded, right = [], [], []
    for g in range(groups):
        sl = slice(g * n, (g + 1) * n)
        t = [s.strip() for s in texts[sl]]
        distinct.append(len(set(t)))
        rewarded.append(len({s for s, r in zip(t, raw[sl]) if r > 0}))
        right.append(len({s for s, c in zip(t, correct[sl]) if c}))
    per_group = correct.reshape(groups, n)
    return {"div/distinct": float(np.mean(distinct)), "div/distinct_rewarded": float(np.mean(rewarded)),
            "div/distinct_correct": float(np.mean(right)), f"div/pass@{n}": float(per_group.any(axis=1).mean()),
            f"div/avg@{n}": float(per_group.mean()), "div/rewarded_rate": float((raw > 0).mean())}


def entropy_by_position(entropy: torch.Tensor, positions: torch.Tensor, max_positions: int = 12) -> dict[str, float]:
    """Mean entropy at each response position (``positions`` [B, L] marks response tokens)."""
    pos = positions.bool()
    index = pos.long().cumsum(dim=1) - 1  # response position of every marked token
    out: dict[str, float] = {}
    ent = entropy.double()
    for i in range(max_positions):
        sel = pos & (index == i)
        if not bool(sel.any()):
            break
        out[f"entropy/pos_{i}"] = float(ent[sel].mean())
    return out


class GroupedSamples(Protocol):
    """What the step's rollout offers (:class:`megacov.trainer.rollout.Rollout`): n samples per prompt."""

    n: int

    def flat(self, name: str) -> list[Any]: ...

    def array(self, name: str) -> np.ndarray: ...


def diversity_metrics(samples: GroupedSamples, entropy: torch.Tensor | None = None,
                      positions: torch.Tensor | None = None, max_positions: int = 12) -> dict[str, float]:
    """All of the module's numbers for one step (entropy ones only when ``entropy`` is given)."""
    out = group_diversity(samples.flat("texts"), samples.array("raw"), samples.array("correct"), samples.n)
    if entropy is not None and positions is not None:
        out.update(entropy_by_position(entropy, positions, max_positions))
    return out
