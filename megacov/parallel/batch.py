"""``ActorBatch``: the tensors one actor update needs, and how they are split over ranks.

Every tensor is [B, L], right-padded, with one sequence length L for the whole global RL batch, so a
token's *global id* ``global_seq_id * L + t`` depends only on where the sample sits in the global
batch, never on the DP rank or micro-batch that processes it. That id is what makes the Clip-Cov /
KL-Cov choice independent of the layout (see :mod:`megacov.parallel.selection`).

Column convention: ``log_prob[:, t] = log p(input_ids[:, t] | input_ids[:, :t])`` for t >= 1, and
``response_mask[:, t]`` is 1 when the *target* token at position t is a response token to train
on. Column 0 has no prediction, so its mask must be 0.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_TENSOR_FIELDS = ("input_ids", "position_ids", "response_mask", "old_log_prob", "advantages",
                  "ref_log_prob", "loss_weight")


@dataclass
class ActorBatch:
    input_ids: torch.Tensor
    """[B, L] int64 token ids (prompt + response, right-padded)."""
    position_ids: torch.Tensor
    """[B, L] int64 positions fed to the rotary embedding."""
    response_mask: torch.Tensor
    """[B, L] bool/float: 1 where the target token at t is a response token to train on."""
    old_log_prob: torch.Tensor
    """[B, L] log-probs of the behaviour policy (same column convention as the model's)."""
    advantages: torch.Tensor
    """[B, L] per-token advantages."""
    global_seq_ids: torch.Tensor
    """[B] int64 index of each sequence in the global RL batch; -1 marks a padding row."""
    seq_len: int
    """L, identical for the whole global batch (global token id = global_seq_id * L + t)."""
    ref_log_prob: torch.Tensor | None = None
    """[B, L] log-probs of the reference policy (needed only for a KL-to-reference loss)."""
    loss_weight: torch.Tensor | None = None
    """[B, L] detached per-token multipliers of the policy loss (rollout correction: TIS)."""

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(self.input_ids.shape)}")
        shape = tuple(self.input_ids.shape)
        if shape[1] != self.seq_len:
            raise ValueError(f"input_ids has {shape[1]} columns but seq_len is {self.seq_len}")
        for name in _TENSOR_FIELDS:
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} like input_ids, got {tuple(t.shape)}")
        if tuple(self.global_seq_ids.shape) != shape[:1]:
            raise ValueError(f"global_seq_ids must have shape ({shape[0]},), got "
                             f"{tuple(self.global_seq_ids.shape)}")
        if self.global_seq_ids.dtype != torch.int64 or self.input_ids.dtype != torch.int64:
            raise TypeError("input_ids and global_seq_ids must be int64")
        if shape[0] and bool(self.response_mask[:, 0].bool().any()):
            raise ValueError("response_mask[:, 0] must be 0: position 0 has no prediction "
                             "(log_prob[:, t] predicts input_ids[:, t] from the tokens before it)")

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def mask(self) -> torch.Tensor:
        """Boolean response mask, excluding padding rows."""
        return self.response_mask.bool() & (self.global_seq_ids >= 0).unsqueeze(1)

    @property
    def global_token_ids(self) -> torch.Tensor:
        """[B, L] int64 ``global_seq_id * L + t`` (negative on padding rows)."""
        t = torch.arange(self.seq_len, device=self.input_ids.device, dtype=torch.int64)
        ids = self.global_seq_ids.unsqueeze(1) * self.seq_len + t
        return torch.where((self.global_seq_ids >= 0).unsqueeze(1), ids, torch.full_like(ids, -1))

    def _map(self, fn) -> ActorBatch:
        kw = {name: (fn(getattr(self, name)) if getattr(self, name) is not None else None)
              for name in _TENSOR_FIELDS}
        return dataclasses.replace(self, global_seq_ids=fn(self.global_seq_ids), **kw)

    def rows(self, start: int, stop: int) -> ActorBatch:
        return self._map(lambda t: t[start:stop])

    def to(self, device: torch.device | str) -> ActorBatch:
        return self._map(lambda t: t.to(device))

    def shard(self, dp_rank: int, dp_size: int) -> ActorBatch:
        """This DP rank's contiguous share (sizes differ by at most one; none may be empty)."""
        if self.batch_size < dp_size:
            raise ValueError(f"a batch of {self.batch_size} sequences cannot feed {dp_size} "
                             "data-parallel ranks")
        bounds = _split_points(self.batch_size, dp_size)
        return self.rows(bounds[dp_rank], bounds[dp_rank + 1])

    def micro_batches(self, micro_batch_size: int, pad_last: bool = False) -> list[ActorBatch]:
        """Consecutive micro-batches of ``micro_batch_size`` sequences.

        ``pad_last`` fills a short last micro-batch with padding rows (mask 0, global id -1) so all
        micro-batches have one shape, which megatron's pipeline schedule requires.
        """
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        out = [self.rows(s, s + micro_batch_size) for s in range(0, self.batch_size, micro_batch_size)]
        if pad_last and out and out[-1].batch_size < micro_batch_size:
            out[-1] = out[-1].padded(micro_batch_size)
        return out

    @property
    def token_counts(self) -> torch.Tensor:
        """[B] int64 tokens of each row up to its last trained target (0 on padding rows, 1 on rows
        with nothing to train): what a row costs when packed, used to balance the cut."""
        cols = torch.arange(1, self.seq_len + 1, device=self.input_ids.device)
        last = (self.response_mask.bool() * cols).amax(dim=1).clamp(min=1) if self.seq_len else cols
        return torch.where(self.global_seq_ids >= 0, last, torch.zeros_like(last)).to(torch.int64)

    def select(self, index: Sequence[int]) -> ActorBatch:
        """The rows ``index`` (in that order); each keeps its global sequence id."""
        idx = torch.as_tensor(list(index), dtype=torch.int64, device=self.input_ids.device)
        return self._map(lambda t: t.index_select(0, idx))

    def balanced_shard(self, dp_rank: int, dp_size: int) -> ActorBatch:
        """This DP rank's share when ranks carry near-equal tokens (:func:`balanced_partition`)."""
        from megacov.parallel.partition import balanced_partition

        return self.select(balanced_partition(self.token_counts.tolist(), dp_size)[dp_rank])

    def token_budget_micro_batches(self, max_tokens: int, pad_rows: bool = False) -> list[ActorBatch]:
        """Micro-batches of at most ``max_tokens`` tokens (:attr:`token_counts`; a longer row goes
        alone). ``pad_rows`` gives all of them the row count of the largest (pipeline schedules)."""
        from megacov.parallel.partition import token_budget_groups

        out = [self.select(g) for g in token_budget_groups(self.token_counts.tolist(), max_tokens)]
        rows = max(mb.batch_size for mb in out) if pad_rows and out else 0
        return [mb.padded(rows) for mb in out]

    def padded(self, rows: int) -> ActorBatch:
        """This batch with padding rows appended up to ``rows`` sequences."""
        extra = rows - self.batch_size
        if extra <= 0:
            return self

        def pad(t: torch.Tensor) -> torch.Tensor:
            fill = -1 if t is self.global_seq_ids else 0
            block = torch.full((extra,) + tuple(t.shape[1:]), fill, dtype=t.dtype, device=t.device)
            return torch.cat([t, block])

        out = dataclasses.replace(self, global_seq_ids=pad(self.global_seq_ids),
                                  **{n: pad(getattr(self, n)) for n in _TENSOR_FIELDS
                                     if getattr(self, n) is not None})
        out.position_ids[self.batch_size:] = torch.arange(self.seq_len, device=out.position_ids.device)
        return out

    @staticmethod
    def concat(parts: Sequence[ActorBatch]) -> ActorBatch:
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        kw = {n: (torch.cat([getattr(p, n) for p in parts]) if getattr(first, n) is not None else None)
              for n in _TENSOR_FIELDS}
        return dataclasses.replace(first, global_seq_ids=torch.cat([p.global_seq_ids for p in parts]), **kw)


def _split_points(n: int, parts: int) -> list[int]:
    base, rem = divmod(n, parts)
    points = [0]
    for i in range(parts):
        points.append(points[-1] + base + (1 if i < rem else 0))
    return points
