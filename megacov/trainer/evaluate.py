"""Held-out evaluation: avg@k and pass@k per dataset at a given temperature.

Each prompt is sampled k times. avg@k is the mean correctness over all k x prompts samples (the
expected accuracy of one sample); pass@k is the share of prompts with at least one correct sample
among its k. Both use exactly the k samples drawn, so they are plain averages, not estimators over a
larger n. ``val/acc`` is the mean avg@k over datasets -- what ``megacov analyze`` fits the
R = -a exp(H) + b law to.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np

from megacov.data import PromptRecord


def dataset_name(path: str) -> str:
    """Metric-name stem of a dataset file: ``data/aime24.parquet`` -> ``aime24``."""
    base = os.path.basename(path)
    for ext in (".jsonl", ".json", ".parquet"):
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
    return base.replace("/", "_").replace(" ", "_") or "eval"


def unique_names(paths: Sequence[str]) -> list[str]:
    """Dataset names, suffixed ``_2``, ``_3`` ... when two files share a stem."""
    names, seen = [], {}
    for path in paths:
        name = dataset_name(path)
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return names


def avg_pass_at_k(correct: np.ndarray) -> tuple[float, float]:
    """``correct`` [prompts, k] booleans -> (avg@k, pass@k)."""
    correct = np.asarray(correct, dtype=bool)
    if correct.ndim != 2 or correct.shape[0] == 0:
        raise ValueError(f"expected a non-empty [prompts, k] array, got shape {correct.shape}")
    return float(correct.mean()), float(correct.any(axis=1).mean())


def eval_metrics(per_dataset: dict[str, np.ndarray], k: int,
                 scores: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """``val/<name>/avg@k``, ``val/<name>/pass@k``, ``val/acc`` and, given the raw ``scores``,
    ``val/<name>/score`` and ``val/score``: the mean graded reward, which for a reward with partial
    credit says more than the share above the correctness threshold."""
    out: dict[str, float] = {}
    avgs, means = [], []
    for name, correct in per_dataset.items():
        avg, pas = avg_pass_at_k(correct)
        out[f"val/{name}/avg@{k}"] = avg
        out[f"val/{name}/pass@{k}"] = pas
        avgs.append(avg)
        if scores is not None:
            out[f"val/{name}/score"] = float(np.mean(scores[name]))
            means.append(out[f"val/{name}/score"])
    if avgs:
        out["val/acc"] = float(np.mean(avgs))
    if means:
        out["val/score"] = float(np.mean(means))
    return out


def evaluate(datasets: dict[str, list[PromptRecord]], generate: Callable[..., list[list[Any]]],
             reward_mgr: Any, *, k: int, temperature: float, seed: int) -> dict[str, float]:
    """Sample k responses per prompt of every dataset and score them.

    ``generate(prompt_ids, n=k, temperature=..., seed=...)`` returns, per prompt, k samples with
    ``.text`` and ``.truncated``; correctness uses the reward's raw score (no overlong penalty).
    """
    per_dataset: dict[str, np.ndarray] = {}
    scores: dict[str, np.ndarray] = {}
    lengths: dict[str, float] = {}
    for name, records in datasets.items():
        samples = generate([list(r.prompt_ids) for r in records], n=k, temperature=temperature, seed=seed)
        flat = [(rec, s) for rec, group in zip(records, samples) for s in group]
        batch = reward_mgr.score([s.text for _, s in flat], [r.answer for r, _ in flat],
                                 [r.question for r, _ in flat])
        per_dataset[name] = batch.correct.reshape(len(records), k)
        scores[name] = np.asarray(batch.raw, dtype=np.float64)
        lengths[f"val/{name}/len_mean"] = float(np.mean([len(s.token_ids) for _, s in flat]))
    return {**eval_metrics(per_dataset, k, scores), **lengths}
