"""Clip-Cov / KL-Cov with critic advantages: GAE gives *token-varying* advantages (the outcome
estimators give one value per sequence), and the global selection over DP ranks must still equal the
single-process whole-batch choice, token for token."""
from __future__ import annotations

import os

import pytest
import torch

from megacov.algorithms import algorithm_hparams, compute_advantages
from megacov.algorithms import selection as sel
from megacov.parallel.batch import ActorBatch
from megacov.parallel.spawn import run_distributed


def _gae_batch(seed: int, b: int = 12, length: int = 10) -> tuple[ActorBatch, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, length, dtype=torch.bool)
    for r in range(b - 1):  # the last row has no response token
        start = int(torch.randint(1, 4, (1,), generator=g))
        mask[r, start:start + int(torch.randint(2, length - start + 1, (1,), generator=g))] = True
    values = torch.randn(b, length, generator=g, dtype=torch.float64)
    rewards = torch.randint(0, 2, (b,), generator=g).double()
    adv = compute_advantages("gae", rewards, torch.arange(b), mask, algorithm_hparams(lam=0.9), values=values)
    lp = -torch.rand(b, length, generator=g, dtype=torch.float64) * 4
    old = lp + 0.2 * torch.randn(b, length, generator=g, dtype=torch.float64)
    batch = ActorBatch(input_ids=torch.zeros(b, length, dtype=torch.long),
                       position_ids=torch.arange(length).expand(b, length).clone(), response_mask=mask.double(),
                       old_log_prob=old, advantages=adv.double(), global_seq_ids=torch.arange(b) + 50,
                       seq_len=length)
    return batch, lp * mask


def _hp(loss: str, ratio: float):
    return algorithm_hparams(policy_loss=loss, clip_cov_ratio=ratio, kl_cov_ratio=ratio, clip_cov_lb=0.0,
                             clip_cov_ub=3.0, seed=3)


def _whole(batch: ActorBatch, lp: torch.Tensor, loss: str, ratio: float) -> list[int]:
    m, ids = batch.mask, batch.global_token_ids
    stats = sel.scope_stats(lp, batch.advantages, m)
    if loss == "clip_cov":
        chosen = sel.select_clip_cov(lp, batch.old_log_prob, batch.advantages, m, ids, stats, hp=_hp(loss, ratio),
                                     step=2)
    else:
        chosen = sel.select_kl_cov(lp, batch.advantages, m, ids, stats, kl_cov_ratio=ratio)
    return sorted(ids[chosen].tolist())


def _worker(rank: int, world: int, cases: list) -> list:
    import torch.distributed as dist

    from megacov.parallel.selection import select_global

    dist.init_process_group("gloo")
    out = []
    try:
        for seed, loss, ratio in cases:
            batch, lp = _gae_batch(seed)
            shard = batch.shard(rank, world)
            start = sum(batch.shard(r, world).batch_size for r in range(rank))
            res = select_global(lp[start:start + shard.batch_size], shard.old_log_prob, shard.advantages, shard.mask,
                                shard.global_token_ids, hp=_hp(loss, ratio), step=2, dp_group=dist.group.WORLD)
            out.append(res.selected_ids.tolist())
    finally:
        dist.destroy_process_group()
    return out


CASES = [(seed, loss, ratio) for seed in (0, 1) for loss in ("clip_cov", "kl_cov") for ratio in (0.05, 0.3)]


def test_gae_advantages_vary_within_a_sequence():
    batch, _ = _gae_batch(0)
    row = batch.advantages[0][batch.mask[0]]
    assert row.numel() > 1 and float(row.std()) > 0


@pytest.mark.parametrize("world", [2, 3])
def test_global_selection_with_gae_advantages(world):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = run_distributed(_worker, world, CASES, timeout_s=300)
    for i, (seed, loss, ratio) in enumerate(CASES):
        batch, lp = _gae_batch(seed)
        want = _whole(batch, lp, loss, ratio)
        assert want, (seed, loss, ratio)
        for r in results:
            assert r[i] == want, (seed, loss, ratio)
