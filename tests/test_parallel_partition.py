"""Token-balanced DP shares and token-budget micro-batches: the partitions themselves, and that the
actor's cut (selection, normaliser, log-probs) does not depend on them."""
from __future__ import annotations

import random

import pytest
import torch

from megacov.parallel.batch import ActorBatch
from megacov.parallel.partition import balanced_partition, imbalance, token_budget_groups


def _batch(lengths: list[int], seq_len: int) -> ActorBatch:
    b = len(lengths)
    mask = torch.zeros(b, seq_len, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, 1:n] = True
    g = torch.Generator().manual_seed(0)
    return ActorBatch(input_ids=torch.randint(0, 50, (b, seq_len), generator=g),
                      position_ids=torch.arange(seq_len).expand(b, seq_len).clone(), response_mask=mask,
                      old_log_prob=-torch.rand(b, seq_len, generator=g), advantages=torch.randn(b, seq_len, generator=g),
                      global_seq_ids=torch.arange(b), seq_len=seq_len)


def test_balanced_partition_covers_every_index_once_and_beats_contiguous_shares() -> None:
    rng = random.Random(1)
    lengths = [int(rng.paretovariate(1.2) * 40) for _ in range(64)]
    lengths[:4] = [4000, 3500, 3000, 2500]  # the long tail sits in the first contiguous share
    groups = balanced_partition(lengths, 4)
    assert sorted(i for g in groups for i in g) == list(range(64))
    assert all(g == sorted(g) and g for g in groups)
    balanced = imbalance([sum(lengths[i] for i in g) for g in groups])
    contiguous = imbalance([sum(lengths[s:s + 16]) for s in range(0, 64, 16)])
    assert balanced < 1.05 < contiguous


def test_balanced_partition_is_lpt_on_a_known_case() -> None:
    # LPT: 7->0, 6->1, 5->1 (6<7), 4->0, 3->1? loads 11/11 -> ties on count: 0 has 2, 1 has 2 -> group 0
    assert balanced_partition([7, 6, 5, 4, 3], 2) == [[0, 3, 4], [1, 2]]
    with pytest.raises(ValueError):
        balanced_partition([1], 2)


def test_token_budget_groups_respect_the_budget() -> None:
    rng = random.Random(2)
    lengths = [rng.randint(1, 90) for _ in range(50)] + [250]
    groups = token_budget_groups(lengths, 100)
    assert sorted(i for g in groups for i in g) == list(range(51))
    for g in groups:
        assert sum(lengths[i] for i in g) <= 100 or len(g) == 1
    assert [50] in groups  # longer than the budget: alone
    assert len(groups) <= -(-sum(lengths[:50]) // 100) * 2  # first-fit decreasing is within 2x of the bound


def test_batch_token_counts_select_and_budget_micro_batches() -> None:
    batch = _batch([5, 12, 3, 9, 2], seq_len=12)
    assert batch.token_counts.tolist() == [5, 12, 3, 9, 2]
    micro = batch.token_budget_micro_batches(14, pad_rows=True)
    ids = sorted(int(g) for mb in micro for g in mb.global_seq_ids if g >= 0)
    assert ids == [0, 1, 2, 3, 4]
    assert len({mb.batch_size for mb in micro}) == 1  # one shape for a pipeline schedule
    for mb in micro:
        real = mb.global_seq_ids >= 0
        assert int(mb.token_counts[real].sum()) <= 14 or int(real.sum()) == 1
        # rows keep their global token ids, so a selection made on the whole batch maps onto them
        assert torch.equal(mb.global_token_ids[real], batch.global_token_ids[mb.global_seq_ids[real]])
        assert torch.equal(mb.advantages[real], batch.advantages[mb.global_seq_ids[real]])
    shares = [batch.balanced_shard(r, 2) for r in range(2)]
    assert sorted(int(g) for s in shares for g in s.global_seq_ids) == [0, 1, 2, 3, 4]
    assert abs(int(shares[0].token_counts.sum()) - int(shares[1].token_counts.sum())) <= 3


def test_selection_and_normaliser_do_not_depend_on_the_token_cut() -> None:
    """The global choice and normaliser read the whole mini-batch: the same on any permutation of
    its rows (what a token-balanced cut produces), and mapped back per micro-batch by global id."""
    from megacov.config.schema import AlgorithmConfig
    from megacov.parallel.selection import global_normalizer, global_scope_stats, select_global

    batch = _batch([5, 12, 3, 9, 2, 11, 7], seq_len=12)
    hp = AlgorithmConfig(policy_loss="kl_cov", kl_cov_ratio=0.2)

    def choose(b: ActorBatch) -> list[int]:
        stats = global_scope_stats(b.old_log_prob, b.advantages, b.mask, None)
        out = select_global(b.old_log_prob, b.old_log_prob, b.advantages, b.mask, b.global_token_ids, hp=hp,
                            step=1, dp_group=None, stats=stats, rule="kl_cov")
        return out.selected_ids.tolist()

    perm = [int(i) for g in balanced_partition(batch.token_counts.tolist(), 3) for i in g]
    shuffled = batch.select(perm)
    assert perm != sorted(perm)
    assert choose(shuffled) == choose(batch) and choose(batch)
    n1 = global_normalizer(batch.mask, None, 12)
    n2 = global_normalizer(shuffled.mask, None, 12)
    assert (n1.num_tokens, n1.num_seqs) == (n2.num_tokens, n2.num_seqs)
