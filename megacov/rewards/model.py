"""``reward.name=model``: a trained scalar reward model (Bradley-Terry head) scores each response.

The model is an HF ``AutoModelForSequenceClassification`` checkpoint with exactly one label; its
score of a text is the head's output at the last non-padding token (what transformers computes).
The text scored is the question followed by the response; the reward model must share the actor's
tokenizer, which :func:`check_reward_model` verifies, with the scalar head, at start-up (``--dry-run``
included), before any worker starts.

Scores are computed in batches of ``reward.model_batch_size`` (right padding), optionally normalised
by a running mean and std over every score seen so far (``reward.model_normalize``; its state is
saved with the trainer state), and combined with a rule reward ``reward.rule`` by weights:
``model_weight * model + rule_weight * rule``.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional, Sequence

from megacov.rewards.pool import Outcome, RewardSpecError

#: Added to the running std before dividing (a constant score stream normalises to 0, not NaN).
NORM_EPS = 1e-6


def _read_config(path: str) -> dict[str, Any]:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise RewardSpecError(f"reward.model_path: no config.json in '{path}'")
    with open(cfg_file) as fh:
        return json.load(fh)


def check_reward_model(reward_cfg: Any, actor_path: str) -> None:
    """One-line errors for a reward model without a scalar head or with another tokenizer than the actor's."""
    if reward_cfg.name != "model":
        return
    path = reward_cfg.model_path
    if not path:
        raise RewardSpecError("reward.name=model needs reward.model_path (an HF sequence-classification directory)")
    hf = _read_config(path)
    archs = hf.get("architectures") or []
    labels = int(hf.get("num_labels", len(hf.get("id2label") or {}) or 2))
    if not any(a.endswith("ForSequenceClassification") for a in archs) or labels != 1:
        raise RewardSpecError(f"reward.model_path={path}: not a scalar reward model (architectures {archs}, "
                              f"{labels} labels; needs a *ForSequenceClassification head with num_labels=1)")
    from transformers import AutoTokenizer

    mine, theirs = AutoTokenizer.from_pretrained(path).get_vocab(), AutoTokenizer.from_pretrained(actor_path).get_vocab()
    if mine != theirs:
        diff = sorted(set(mine.items()) ^ set(theirs.items()))[:3]
        raise RewardSpecError(f"reward.model_path={path}: tokenizer differs from the actor's ({actor_path}): "
                              f"{len(mine)} vs {len(theirs)} tokens, e.g. {diff}")


class RunningNorm:
    """Mean and (population) variance of every score seen, updated batch by batch (Chan et al.'s merge)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, xs: Sequence[float]) -> None:
        n = len(xs)
        if not n:
            return
        mean = sum(xs) / n
        m2 = sum((x - mean) ** 2 for x in xs)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    def normalise(self, xs: Sequence[float]) -> list[float]:
        std = math.sqrt(self.m2 / self.count) if self.count else 1.0
        return [(x - self.mean) / (std + NORM_EPS) for x in xs]

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


class _Scorer:
    """Scores of a batch of texts, normalised by the running statistics when ``norm`` is set."""

    norm: Optional[RunningNorm] = None

    def raw_scores(self, texts: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def scores(self, texts: Sequence[str]) -> list[float]:
        raw = self.raw_scores(texts)
        if self.norm is None:
            return raw
        self.norm.update(raw)
        return self.norm.normalise(raw)


class ScalarRewardModel(_Scorer):
    """A sequence-classification model with one label, scoring texts in batches (plain HF, fp32 on CPU)."""

    def __init__(self, path: str, *, batch_size: int, normalize: bool, device: Optional[str] = None) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.model = AutoModelForSequenceClassification.from_pretrained(path, torch_dtype=dtype).to(self.device).eval()
        if int(self.model.config.num_labels) != 1:
            raise RewardSpecError(f"reward.model_path={path}: {self.model.config.num_labels} labels, need 1")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.norm: Optional[RunningNorm] = RunningNorm() if normalize else None

    def raw_scores(self, texts: Sequence[str]) -> list[float]:
        import torch

        out: list[float] = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, return_tensors="pt")
                logits = self.model(input_ids=enc["input_ids"].to(self.device),
                                    attention_mask=enc["attention_mask"].to(self.device)).logits
                out.extend(float(x) for x in logits[:, 0].float().cpu())
        return out



class RewardModelWorker:
    """One rank of the reward model's worker group (hosted by :class:`~megacov.workers.group.WorkerGroup`)."""

    def __init__(self, path: str, batch_size: int) -> None:
        self.model = ScalarRewardModel(path, batch_size=batch_size, normalize=False)

    def raw_scores(self, texts: Sequence[str]) -> list[float]:
        return self.model.raw_scores(texts)


class RemoteRewardModel(_Scorer):
    """The reward model served by its own Ray worker group of ``reward.model_workers`` ranks (one GPU
    each on GPU machines): texts are split into contiguous blocks, one per rank, scored concurrently,
    and normalised in the driver so the running statistics see every score in order."""

    def __init__(self, reward_cfg: Any, env: dict[str, str], use_gpu: bool = False) -> None:
        """``use_gpu`` is the runtime's decision from the cluster's resources, not this process's CUDA."""
        from megacov.workers.group import WorkerGroup

        self.group = WorkerGroup(RewardModelWorker, int(reward_cfg.model_workers),
                                 args=(os.path.abspath(reward_cfg.model_path), int(reward_cfg.model_batch_size)),
                                 gpus_per_worker=1.0 if use_gpu else 0.0, env=env,
                                 name="megacov-reward-model")
        self.norm: Optional[RunningNorm] = RunningNorm() if reward_cfg.model_normalize else None

    def raw_scores(self, texts: Sequence[str]) -> list[float]:
        import ray

        n = self.group.world_size
        size = -(-len(texts) // n) if texts else 0
        blocks = [list(texts[r * size:(r + 1) * size]) for r in range(n)]
        refs = [self.group.execute_rank_async(r, "raw_scores", blocks[r]) for r in range(n) if blocks[r]]
        return [x for part in ray.get(refs) for x in part]


    def close(self) -> None:
        self.group.shutdown()


def combine(model_scores: Sequence[float], rule: Optional[Sequence[Outcome]], *, model_weight: float,
            rule_weight: float) -> list[Outcome]:
    """``model_weight * model + rule_weight * rule`` per response; a failed rule call keeps its status."""
    if rule is None:
        return [Outcome(model_weight * s, "ok") for s in model_scores]
    return [Outcome(model_weight * s + rule_weight * r.score, r.status, r.detail)
            for s, r in zip(model_scores, rule)]
