"""Sequences (prompt + response token lists) -> the padded ``ActorBatch`` tensors, and back.

One sequence length L for the whole RL batch (the longest prompt + response, rounded up to
:func:`seq_multiple`, which sequence parallelism needs: megatron splits the sequence over TP ranks and
asserts divisibility), right padding, and
``response_mask[:, t] = 1`` exactly where the *target* token t is a response token -- the convention
of :mod:`megacov.parallel.batch`. Rows keep their order, so row i is global sequence i and the
Clip-Cov / KL-Cov choice never depends on how the batch is later split.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from megacov.parallel.batch import ActorBatch


def build_actor_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, pad_id: int,
                      train_rows: Optional[Sequence[bool]] = None,
                      rollout_logprobs: Optional[Sequence[Sequence[float]]] = None, multiple: int = 1
                      ) -> tuple[ActorBatch, Optional[torch.Tensor]]:
    """The batch (old log-probs and advantages zero until computed) and, when given, the rollout
    log-probs aligned to the same [B, L] columns.

    ``train_rows`` False keeps a row in the batch (its tokens still count for nothing: mask 0), which
    is how overlong-filtered responses leave the loss without changing the batch shape. ``multiple``
    rounds L up (:func:`seq_multiple`); the extra columns are padding with mask 0, and under causal
    attention they change no earlier position, so log-probs and the loss are those of the unpadded batch.
    """
    if multiple < 1:
        raise ValueError(f"multiple={multiple} must be >= 1")
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    b = len(prompts)
    length = max(len(p) + len(r) for p, r in zip(prompts, responses))
    length = -(-length // multiple) * multiple
    ids = torch.full((b, length), int(pad_id), dtype=torch.int64)
    mask = torch.zeros(b, length, dtype=torch.bool)
    rollout_lp = torch.zeros(b, length, dtype=torch.float32) if rollout_logprobs is not None else None
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not p:
            raise ValueError(f"sequence {i} has an empty prompt")
        seq = list(p) + list(r)
        ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.int64)
        if train_rows is None or train_rows[i]:
            mask[i, len(p):len(seq)] = True
        if rollout_lp is not None and len(r):
            lp = rollout_logprobs[i]  # type: ignore[index]
            if len(lp) != len(r):
                raise ValueError(f"sequence {i}: {len(lp)} rollout log-probs for {len(r)} response tokens")
            rollout_lp[i, len(p):len(seq)] = torch.tensor(list(lp), dtype=torch.float32)
    batch = ActorBatch(
        input_ids=ids, position_ids=torch.arange(length, dtype=torch.int64).expand(b, length).contiguous(),
        response_mask=mask, old_log_prob=torch.zeros(b, length), advantages=torch.zeros(b, length),
        global_seq_ids=torch.arange(b, dtype=torch.int64), seq_len=length)
    return batch, rollout_lp


def seq_multiple(parallel: Any) -> int:
    """What the batch length must be a multiple of: the TP size under sequence parallelism (the
    actor's and the reference's sequence is split over TP ranks), else 1. ``parallel`` is the
    config's ``parallel`` section."""
    return int(parallel.tp) if parallel.sequence_parallel and parallel.tp > 1 else 1


def response_positions(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """[B, L] bool: where response tokens sit, whether or not they are trained on (metrics, mismatch)."""
    out = torch.zeros(len(prompts), length, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        out[i, len(p):len(p) + len(r)] = True
    return out


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over ``mask`` in float64 (0 when empty)."""
    m = mask.bool()
    n = int(m.sum())
    return float(values.double()[m].sum() / n) if n else 0.0


def group_ids_for(num_prompts: int, n: int) -> np.ndarray:
    """Group id of every sequence when each prompt's n samples are consecutive."""
    return np.repeat(np.arange(num_prompts), n)
