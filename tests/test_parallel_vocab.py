"""Vocab-parallel log-prob / entropy kernel and the ActorBatch container.

The kernel is compared with a plain float64 ``log_softmax`` over the full (real) vocabulary on the
same logits: values, and gradients of an arbitrary linear combination of log-prob and entropy
(so both backward paths are exercised). TP > 1 runs on gloo processes without megatron.
"""
from __future__ import annotations

import os

import pytest
import torch

from megacov.parallel.batch import ActorBatch
from megacov.parallel.spawn import run_distributed
from megacov.parallel.vocab_parallel import (
    chunk_rows,
    reference_logprob_entropy,
    token_logprob_entropy,
    vocab_parallel_logprob_entropy,
    vocab_shard,
)


def _problem(n: int, v: int, real: int, seed: int, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    target = torch.randint(0, real, (n,), generator=g)
    w_lp = torch.randn(n, generator=g, dtype=torch.float64)
    w_h = torch.randn(n, generator=g, dtype=torch.float64)
    return logits, target, w_lp, w_h


def _reference(logits, target, real, temperature, w_lp, w_h):
    x = logits.detach().double().requires_grad_()
    lp, h = reference_logprob_entropy(x, target, real, temperature)
    ((lp * w_lp).sum() + (h * w_h).sum()).backward()
    return lp.detach(), h.detach(), x.grad


def _ours(logits, target, real, temperature, w_lp, w_h, *, dtype, chunk, inplace, group=None, rank=0, tp=1):
    v_local = logits.shape[1] // tp
    leaf = logits[:, rank * v_local:(rank + 1) * v_local].to(dtype).requires_grad_()
    x = leaf * 1  # a non-leaf, like the output of megatron's output layer
    lp, h = vocab_parallel_logprob_entropy(x, target, tp_group=group, real_vocab_size=real,
                                           temperature=temperature, chunk_size=chunk,
                                           inplace_backward=inplace)
    ((lp * w_lp.to(lp.dtype)).sum() + (h * w_h.to(h.dtype)).sum()).backward()
    return lp.double().detach(), h.double().detach(), leaf.grad.double()


@pytest.mark.parametrize("real,padded", [(67, 72), (64, 64), (50, 128)])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_float64_matches_full_vocab_reference(real, padded, chunk):
    logits, target, w_lp, w_h = _problem(33, padded, real, seed=real + chunk)
    logits[:, real:] += 30.0  # large padded logits: any leak would dominate the softmax
    ref = _reference(logits, target, real, 0.7, w_lp, w_h)
    got = _ours(logits, target, real, 0.7, w_lp, w_h, dtype=torch.float64, chunk=chunk, inplace=chunk == 7)
    for a, b in zip(got, ref[:2]):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
    assert torch.allclose(got[2][:, :real], ref[2][:, :real], atol=1e-12, rtol=0)
    assert torch.count_nonzero(got[2][:, real:]) == 0  # padded columns get no gradient


@pytest.mark.parametrize("inplace", [False, True])
def test_float32_within_1e6_of_float64(inplace):
    logits, target, w_lp, w_h = _problem(200, 131, 129, seed=3, scale=1.5)
    ref = _reference(logits.float(), target, 129, 1.0, w_lp, w_h)
    lp, h, grad = _ours(logits, target, 129, 1.0, w_lp, w_h, dtype=torch.float32, chunk=64, inplace=inplace)
    assert (lp - ref[0]).abs().max() < 1e-6
    assert (h - ref[1]).abs().max() < 1e-6
    assert (grad - ref[2]).abs().max() < 1e-6 * ref[2].abs().max() * 10


def test_float32_log_prob_error_is_its_own_rounding_at_large_logits():
    """Logits of +-80: |log p| reaches ~120, where one fp32 ulp is 7.6e-6. The kernel's log-prob is
    the float64 value rounded once (relative error <= 6e-8), its entropy within 1e-6."""
    logits, target, w_lp, w_h = _problem(256, 4096, 4096, seed=8, scale=20.0)
    logits = (logits / logits.abs().max() * 80).float().double()
    ref = _reference(logits, target, 4096, 1.0, w_lp, w_h)
    lp, h, _ = _ours(logits, target, 4096, 1.0, w_lp, w_h, dtype=torch.float32, chunk=None, inplace=True)
    assert ref[0].abs().max() > 64  # the regime where absolute 1e-6 is below fp32 resolution
    assert ((lp - ref[0]).abs() / ref[0].abs().clamp(min=1)).max() < 1e-7
    assert (h - ref[1]).abs().max() < 1e-6


def test_bf16_logits_use_fp32_statistics():
    logits, target, w_lp, w_h = _problem(64, 96, 90, seed=5)
    bf = logits.to(torch.bfloat16)
    ref = _reference(bf, target, 90, 1.0, w_lp, w_h)
    lp, h, grad = _ours(logits, target, 90, 1.0, w_lp, w_h, dtype=torch.bfloat16, chunk=16, inplace=False)
    # The statistics of the (exactly representable) bf16 inputs are fp32-accurate.
    assert (lp - ref[0]).abs().max() < 1e-5 and (h - ref[1]).abs().max() < 1e-5
    assert grad.dtype == torch.float64 and (grad - ref[2]).abs().max() < 2e-2 * ref[2].abs().max()


def test_without_entropy_and_gradient_paths():
    logits, target, w_lp, _ = _problem(20, 40, 40, seed=9)
    x = logits.clone().requires_grad_()
    lp, h = vocab_parallel_logprob_entropy(x, target, tp_group=None, real_vocab_size=40, with_entropy=False)
    assert torch.count_nonzero(h) == 0
    (lp * w_lp).sum().backward()
    xr = logits.clone().requires_grad_()
    lpr, _ = reference_logprob_entropy(xr, target, 40)
    (lpr * w_lp).sum().backward()
    assert torch.allclose(lp, lpr, atol=1e-12) and torch.allclose(x.grad, xr.grad, atol=1e-12)
    # entropy alone (the entropy bonus) also has the right gradient
    x2 = logits.clone().requires_grad_()
    _, h2 = vocab_parallel_logprob_entropy(x2, target, tp_group=None, real_vocab_size=40, chunk_size=3)
    h2.sum().backward()
    x3 = logits.clone().requires_grad_()
    reference_logprob_entropy(x3, target, 40)[1].sum().backward()
    assert torch.allclose(x2.grad, x3.grad, atol=1e-12)


def test_inplace_backward_refuses_a_second_reader():
    """Another node that saved the same logits fails loudly instead of reading the gradient."""
    logits, target, _, _ = _problem(8, 16, 16, seed=1)
    x = logits.clone().requires_grad_()
    y = x * 1
    lp, _ = vocab_parallel_logprob_entropy(y, target, tp_group=None, real_vocab_size=16, inplace_backward=True)
    other = (y * y).sum()  # saves y for its own backward
    lp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        other.backward()


def test_token_layout_shifts_targets():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30, (3, 9), generator=g)
    logits = torch.randn(3, 9, 32, generator=g, dtype=torch.float64)
    lp, ent = token_logprob_entropy(logits, ids, tp_group=None, real_vocab_size=30, temperature=1.3)
    full = torch.log_softmax(logits[..., :30] / 1.3, dim=-1)
    want = full[:, :-1].gather(2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(lp[:, 1:], want, atol=1e-12) and torch.count_nonzero(lp[:, 0]) == 0
    assert torch.allclose(ent[:, 1:], -(full.exp() * full).sum(-1)[:, :-1], atol=1e-12)


def test_bad_arguments():
    x = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprob_entropy(x, torch.zeros(4, dtype=torch.long), tp_group=None, real_vocab_size=8,
                                       temperature=0.0)
    with pytest.raises(ValueError, match="target"):
        vocab_parallel_logprob_entropy(x, torch.zeros(3, dtype=torch.long), tp_group=None, real_vocab_size=8)
    assert vocab_shard(1, 34, 67) == (34, 33) and vocab_shard(1, 32, 30) == (32, 0)


def _tp_worker(rank: int, world: int, dtype_name: str, real: int, padded: int) -> list:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        logits, target, w_lp, w_h = _problem(41, padded, real, seed=11)
        logits[:, real:] -= 5.0
        dtype = getattr(torch, dtype_name)
        got = _ours(logits, target, real, 0.8, w_lp, w_h, dtype=dtype, chunk=6, inplace=True,
                    group=dist.group.WORLD, rank=rank, tp=world)
        ref = _reference(logits.to(dtype), target, real, 0.8, w_lp, w_h)
        v_local = padded // world
        ref_grad = ref[2][:, rank * v_local:(rank + 1) * v_local]
        return [got[0], got[1], (got[0] - ref[0]).abs().max().item(), (got[1] - ref[1]).abs().max().item(),
                ((got[2] - ref_grad).abs().max() / ref[2].abs().max()).item()]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,real,padded,dtype,tol", [
    (2, 67, 68, "float64", 1e-12),   # last shard partly padding
    (4, 30, 64, "float64", 1e-12),   # shards 2 and 3 are entirely padding
    (2, 67, 68, "float32", 1e-6),
])
def test_tensor_parallel_matches_reference(world, real, padded, dtype, tol):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = run_distributed(_tp_worker, world, dtype, real, padded, timeout_s=300)
    for lp, h, d_lp, d_h, d_grad in results:
        assert d_lp < tol and d_h < tol and d_grad < tol * 10
        # every TP rank holds bit-identical results
        assert torch.equal(lp, results[0][0]) and torch.equal(h, results[0][1])


def _masked_problem(n: int, v: int, seed: int, scale: float = 2.0):
    """Logits with scattered -inf entries (never on a target) and some rows whose second half is
    entirely -inf (a whole TP shard masked)."""
    logits, target, w_lp, w_h = _problem(n, v, v, seed=seed, scale=scale)
    target = target % (v // 2)  # targets in the first half, so masking the second half keeps them
    g = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand(n, v, generator=g) < 0.3
    mask[torch.arange(n), target] = False
    mask[::4, v // 2:] = True
    logits[mask] = float("-inf")
    return logits, target, w_lp, w_h, mask


def _masked_reference(logits, target, temperature, w_lp, w_h):
    """float64 reference with -inf replaced by -1e4: exp underflows to exactly 0 there in float64,
    so values and gradients equal those of the masked distribution without 0 * inf."""
    finite = logits.masked_fill(torch.isneginf(logits), -1e4)
    return _reference(finite, target, logits.shape[1], temperature, w_lp, w_h)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("chunk,inplace", [(1, False), (5, True), (None, True)])
def test_masked_logits_give_finite_entropy_and_zero_gradient(dtype, tol, chunk, inplace):
    logits, target, w_lp, w_h, mask = _masked_problem(24, 40, seed=13)
    ref = _masked_reference(logits.to(dtype).double(), target, 0.9, w_lp, w_h)
    lp, h, grad = _ours(logits, target, 40, 0.9, w_lp, w_h, dtype=dtype, chunk=chunk, inplace=inplace)
    for got in (lp, h, grad):
        assert torch.isfinite(got).all()
    assert (lp - ref[0]).abs().max() < tol and (h - ref[1]).abs().max() < tol
    assert (grad - ref[2]).abs().max() < tol * 10 * ref[2].abs().max()
    assert torch.count_nonzero(grad[mask]) == 0


def test_masked_target_has_log_prob_minus_inf():
    logits, target, _, _ = _problem(3, 10, 10, seed=2)
    logits[0, target[0]] = float("-inf")
    x = logits.clone().requires_grad_()
    lp, h = vocab_parallel_logprob_entropy(x, target, tp_group=None, real_vocab_size=10)
    assert lp[0] == float("-inf") and torch.isfinite(lp[1:]).all() and torch.isfinite(h).all()
    h.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[0, target[0]] == 0


def test_chunk_is_sized_by_bytes():
    assert chunk_rows(10_000, 1024, torch.float32, 1.0) == 128  # 2 buffers x 1024 x 4 bytes per row
    assert chunk_rows(10_000, 1024, torch.bfloat16, 1.0) == 128  # bf16 is worked on in fp32
    assert chunk_rows(10_000, 1024, torch.float64, 1.0) == 64
    assert chunk_rows(10_000, 152064, torch.float32, 16.0) == 13
    assert chunk_rows(10_000, 10**7, torch.float32, 1.0) == 1  # at least one row
    assert chunk_rows(100, 1024, torch.float32, 1.0) == 100 and chunk_rows(10_000, 1024, torch.float32, 1.0, 7) == 7
    logits, target, w_lp, w_h = _problem(50, 64, 64, seed=4)
    one = vocab_parallel_logprob_entropy(logits, target, tp_group=None, real_vocab_size=64, workspace_mib=1e-6)
    all_rows = vocab_parallel_logprob_entropy(logits, target, tp_group=None, real_vocab_size=64)
    assert all(torch.allclose(a, b, atol=1e-13, rtol=0) for a, b in zip(one, all_rows))
    with pytest.raises(ValueError, match="workspace_mib"):
        vocab_parallel_logprob_entropy(logits, target, tp_group=None, real_vocab_size=64, workspace_mib=0)


def _tp_masked_worker(rank: int, world: int, dtype_name: str) -> list:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        logits, target, w_lp, w_h, mask = _masked_problem(21, 48, seed=17)
        dtype = getattr(torch, dtype_name)
        got = _ours(logits, target, 48, 1.0, w_lp, w_h, dtype=dtype, chunk=4, inplace=True,
                    group=dist.group.WORLD, rank=rank, tp=world)
        ref = _masked_reference(logits.to(dtype).double(), target, 1.0, w_lp, w_h)
        v_local = 48 // world
        cols = slice(rank * v_local, (rank + 1) * v_local)
        return [got[0], got[1], (got[0] - ref[0]).abs().max().item(), (got[1] - ref[1]).abs().max().item(),
                ((got[2] - ref[2][:, cols]).abs().max() / ref[2].abs().max()).item(),
                torch.count_nonzero(got[2][mask[:, cols]]).item()]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-6)])
def test_tensor_parallel_masked_logits(dtype, tol):
    """Rows 0, 4, ... have rank 1's whole shard at -inf: it must count as an empty shard."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = run_distributed(_tp_masked_worker, 2, dtype, timeout_s=300)
    for lp, h, d_lp, d_h, d_grad, nonzero_masked in results:
        assert d_lp < tol and d_h < tol and d_grad < tol * 10 and nonzero_masked == 0
        assert torch.equal(lp, results[0][0]) and torch.equal(h, results[0][1])


# ----------------------------------------------------------------------------------------------
# ActorBatch
# ----------------------------------------------------------------------------------------------


def _batch(b: int = 5, length: int = 6) -> ActorBatch:
    mask = torch.zeros(b, length)
    mask[:, 2:] = 1
    return ActorBatch(input_ids=torch.arange(b * length).reshape(b, length) % 7,
                      position_ids=torch.arange(length).expand(b, length).clone(), response_mask=mask,
                      old_log_prob=-torch.rand(b, length), advantages=torch.randn(b, length),
                      global_seq_ids=torch.arange(10, 10 + b), seq_len=length)


def test_batch_shards_and_micro_batches():
    batch = _batch()
    shards = [batch.shard(r, 2) for r in range(2)]
    assert [s.batch_size for s in shards] == [3, 2]
    assert torch.equal(ActorBatch.concat(shards).global_token_ids, batch.global_token_ids)
    assert batch.global_token_ids[1, 4] == 11 * 6 + 4
    micro = shards[0].micro_batches(2, pad_last=True)
    assert [m.batch_size for m in micro] == [2, 2]
    pad = micro[-1]
    assert pad.global_seq_ids.tolist() == [12, -1] and not pad.mask[1].any()
    assert (pad.global_token_ids[1] == -1).all() and pad.position_ids[1].tolist() == list(range(6))
    assert [m.batch_size for m in shards[0].micro_batches(2)] == [2, 1]


def test_batch_validation():
    batch = _batch()
    with pytest.raises(ValueError, match="response_mask\\[:, 0\\]"):
        ActorBatch(**{**batch.__dict__, "response_mask": torch.ones(5, 6)})
    with pytest.raises(ValueError, match="advantages"):
        ActorBatch(**{**batch.__dict__, "advantages": torch.zeros(5, 5)})
    with pytest.raises(ValueError, match="seq_len"):
        ActorBatch(**{**batch.__dict__, "seq_len": 7})
    with pytest.raises(ValueError, match="cannot feed"):
        batch.shard(0, 6)
