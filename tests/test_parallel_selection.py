"""Global Clip-Cov / KL-Cov selection over DP ranks equals the single-process whole-batch choice.

Synthetic float64 batches (no model) are split over 2 or 3 gloo ranks; each rank calls
:func:`select_global` on its shard and must return exactly the ids the pure functions choose when
they see the whole batch, including exact covariance ties that straddle ranks (broken by the
smaller global id) and ranks that hold no candidate at all.
"""
from __future__ import annotations

import os

import pytest
import torch

from megacov.algorithms import algorithm_hparams
from megacov.algorithms import selection as sel
from megacov.algorithms.losses import LossNormalizer
from megacov.parallel.batch import ActorBatch
from megacov.parallel.spawn import run_distributed


def _batch(seed: int, b: int = 12, length: int = 10) -> tuple[ActorBatch, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, length)
    for r in range(b):
        start = int(torch.randint(1, 4, (1,), generator=g))
        mask[r, start:start + int(torch.randint(2, length - start + 1, (1,), generator=g))] = 1
    lp = -torch.rand(b, length, generator=g, dtype=torch.float64) * 4
    old = lp + 0.2 * torch.randn(b, length, generator=g, dtype=torch.float64)
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64).expand(b, length).clone()
    # Exact ties across DP ranks: the last sequence repeats the first (same mask, logp, advantage).
    mask[-1], lp[-1], old[-1], adv[-1] = mask[0], lp[0], old[0], adv[0]
    mask[2] = 0  # a sequence without response tokens
    batch = ActorBatch(input_ids=torch.zeros(b, length, dtype=torch.long),
                       position_ids=torch.arange(length).expand(b, length).clone(), response_mask=mask,
                       old_log_prob=old, advantages=adv * mask, global_seq_ids=torch.arange(b) + 100,
                       seq_len=length)
    return batch, lp * mask


def _hp(loss: str, ratio: float):
    if loss == "high_entropy":  # the rule on top of plain PPO
        return algorithm_hparams(policy_loss="ppo", entropy_top_ratio=ratio, seed=7)
    return algorithm_hparams(policy_loss=loss, clip_cov_ratio=ratio, kl_cov_ratio=ratio, clip_cov_lb=0.0,
                             clip_cov_ub=3.0, seed=7)


def _entropy(seed: int, batch: ActorBatch) -> torch.Tensor:
    """Token entropies with exact ties across ranks (the last sequence repeats the first) and
    within a sequence (values on a coarse grid)."""
    g = torch.Generator().manual_seed(seed + 50)
    ent = torch.randint(0, 12, batch.mask.shape, generator=g).double() / 4
    ent[-1] = ent[0]
    return ent * batch.mask


def _whole_batch(batch: ActorBatch, lp: torch.Tensor, loss: str, ratio: float, step: int, seed: int = 0) -> list[int]:
    hp = _hp(loss, ratio)
    m, ids = batch.mask, batch.global_token_ids
    stats = sel.scope_stats(lp, batch.advantages, m)
    if loss == "clip_cov":
        chosen = sel.select_clip_cov(lp, batch.old_log_prob, batch.advantages, m, ids, stats, hp=hp, step=step)
    elif loss == "high_entropy":
        return _whole_batch_high_entropy(batch, _entropy(seed, batch), ratio)
    else:
        chosen = sel.select_kl_cov(lp, batch.advantages, m, ids, stats, kl_cov_ratio=ratio)
    return sorted(ids[chosen].tolist())


def _whole_batch_high_entropy(batch: ActorBatch, ent: torch.Tensor, ratio: float) -> list[int]:
    """Written out: the count of tokens at or above the (1 - ratio) quantile, ties at the cut to
    the smaller global id (a full sort of (-H, id) pairs)."""
    m = batch.mask.bool()
    ids, h = batch.global_token_ids[m].tolist(), ent[m].tolist()
    k = sel.high_entropy_count(len(ids), ratio)
    order = sorted(zip(h, ids), key=lambda p: (-p[0], p[1]))
    return sorted(i for _, i in order[:k])


def _worker(rank: int, world: int, cases: list) -> list:
    import torch.distributed as dist

    from megacov.parallel.selection import global_normalizer, select_global

    dist.init_process_group("gloo")
    out = []
    try:
        for seed, loss, ratio, step in cases:
            batch, lp = _batch(seed)
            shard = batch.shard(rank, world)
            rows = slice(sum(batch.shard(r, world).batch_size for r in range(rank)), None)
            lp_shard = lp[rows][:shard.batch_size]
            ent_shard = _entropy(seed, batch)[rows][:shard.batch_size]
            res = select_global(lp_shard, shard.old_log_prob, shard.advantages, shard.mask,
                                shard.global_token_ids, hp=_hp(loss, ratio), step=step, dp_group=dist.group.WORLD,
                                entropy=ent_shard, rule="high_entropy" if loss == "high_entropy" else None)
            norm = global_normalizer(shard.mask, dist.group.WORLD, max_len=shard.seq_len)
            mine = res.mask_for(shard.global_token_ids)
            out.append({"ids": res.selected_ids.tolist(), "n_valid": res.stats.n_valid,
                        "mean_logp": float(res.stats.mean_logp), "mean_adv": float(res.stats.mean_adv),
                        "norm": norm, "mine": shard.global_token_ids[mine].tolist(), "n": res.n_target})
    finally:
        dist.destroy_process_group()
    return out


CASES = [(seed, loss, ratio, 3) for seed in (0, 1) for loss in ("clip_cov", "kl_cov") for ratio in (0.02, 0.3)]
CASES += [(0, "kl_cov", 1.0, 3), (0, "clip_cov", 1.0, 5)]  # every candidate chosen
CASES += [(seed, "high_entropy", ratio, 3) for seed in (0, 1) for ratio in (0.07, 0.2, 0.5)]


@pytest.mark.parametrize("world", [2, 3])
def test_global_selection_equals_whole_batch(world):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = run_distributed(_worker, world, CASES, timeout_s=300)
    for i, (seed, loss, ratio, step) in enumerate(CASES):
        batch, lp = _batch(seed)
        want = _whole_batch(batch, lp, loss, ratio, step, seed)
        stats = sel.scope_stats(lp, batch.advantages, batch.mask)
        mine_union = sorted(t for r in results for t in r[i]["mine"])
        for r in results:
            got = r[i]
            assert got["ids"] == want, (seed, loss, ratio)
            assert got["n_valid"] == stats.n_valid
            assert abs(got["mean_logp"] - float(stats.mean_logp)) < 1e-12
            assert abs(got["mean_adv"] - float(stats.mean_adv)) < 1e-12
            assert got["norm"] == LossNormalizer.from_mask(batch.mask, batch.seq_len)
        assert mine_union == want  # every selected token is found by the rank holding it
        assert len(want) > 0


def test_ties_straddle_ranks():
    """The duplicated sequence makes exact KL-Cov ties between the first and the last shard."""
    batch, lp = _batch(0)
    stats = sel.scope_stats(lp, batch.advantages, batch.mask)
    cov = sel.covariance(lp, batch.advantages, batch.mask, stats.mean_logp, stats.mean_adv)
    assert torch.equal(cov[0], cov[-1]) and bool(batch.mask[0].any())
    ids = _whole_batch(batch, lp, "kl_cov", 0.3, 3)
    first = set(batch.global_token_ids[0][batch.mask[0].bool()].tolist())
    last = set(batch.global_token_ids[-1][batch.mask[-1].bool()].tolist())
    # where a tie is cut, the smaller ids (first sequence) win
    assert len(first & set(ids)) >= len(last & set(ids))


def test_high_entropy_ties_are_cut_by_id():
    """The coarse entropy grid ties many tokens at the cut; the count stays exact."""
    batch, _ = _batch(0)
    ent = _entropy(0, batch)
    m = batch.mask.bool()
    k = sel.high_entropy_count(int(m.sum()), 0.2)
    thr = torch.quantile(ent[m], 0.8)
    assert int((ent[m] >= thr).sum()) > k  # ties straddle the cut
    hp = _hp("high_entropy", 0.2)
    stats = sel.scope_stats(batch.old_log_prob, batch.advantages, m)
    inp = sel.SelectionInputs(batch.old_log_prob, batch.old_log_prob, batch.advantages, m, batch.global_token_ids,
                              stats, hp=hp, step=0, entropy=ent)
    chosen = sel.select_in_scope(sel.get_selection_rule("high_entropy"), inp)
    assert int(chosen.sum()) == k
    assert sorted(batch.global_token_ids[chosen].tolist()) == _whole_batch_high_entropy(batch, ent, 0.2)
