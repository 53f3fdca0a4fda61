"""Packed micro-batches (one row, block-diagonal causal mask) give the padded log-probs, entropies
and gradients, under TP and PP, with token-budget micro-batches and token-balanced DP shares."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from megacov.parallel.batch import ActorBatch
from megacov.parallel.packing import pack

LAYOUTS = ((1, 1, 2), (2, 1, 1), (1, 2, 1), (2, 2, 1))  # TP, PP, DP: one spawned world each
MAX_TOKENS = 64


def test_pack_unpack_places_every_token_and_masks_across_sequences() -> None:
    b, L = 3, 6
    mask = torch.zeros(b, L, dtype=torch.bool)
    mask[0, 2:4], mask[1, 1:6], mask[2, 3:5] = True, True, True
    ids = torch.arange(b * L).view(b, L)
    batch = ActorBatch(input_ids=ids, position_ids=torch.arange(L).expand(b, L).clone(), response_mask=mask,
                       old_log_prob=torch.zeros(b, L), advantages=torch.zeros(b, L),
                       global_seq_ids=torch.arange(b), seq_len=L)
    row = pack(batch, length=20)
    assert row.input_ids[0, :15].tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    assert row.position_ids[0, :15].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]
    m = row.attention_mask[0, 0]
    assert not m[5, 4] and m[4, 3] and m[3, 4] and not m[14, 10] and m[10, 9]
    back = row.unpack(row.input_ids.double())
    keep = torch.zeros(b, L, dtype=torch.bool)
    keep[0, 1:4], keep[1, 1:6], keep[2, 1:5] = True, True, True
    assert torch.equal(back[keep], ids.double()[keep]) and not back[~keep].any()


def _leaky_pack(real: Any) -> Any:
    """A plain causal mask over the packed row lets sequences see each other: the check must notice."""
    def leaky(mb: ActorBatch, length: int | None = None) -> Any:
        row = real(mb, length)
        t = row.length
        row.attention_mask = ~torch.ones(t, t, dtype=torch.bool).tril().view(1, 1, t, t)
        return row

    return leaky


def _run_variant(layout: Any, dtype_name: str) -> dict[str, Any]:
    from megacov.parallel.actor import compute_log_probs, train_step
    from megacov.verify import exactness as ex

    spec = ex.TinySpec(vocab=67)
    w = ex.full_weights(spec, 0, getattr(torch, dtype_name))
    batch = ex.make_batch(spec, w, batch_size=8, seq_len=32, seed=0, temperature=0.9)
    hp = ex.case_hparams(ex.Case(loss="kl_cov", micro_batches=1, entropy_top=0.2))
    model, _ = ex._build(spec, layout, ex.RunOptions(dtype_name=dtype_name), batch.seq_len, w)
    shard = batch.balanced_shard(layout.dp_rank, layout.dp)
    kw: dict[str, Any] = dict(temperature=0.9, real_vocab_size=spec.vocab, micro_batch_size=1,
                              max_tokens_per_micro_batch=MAX_TOKENS)
    res: dict[str, Any] = {"keep": shard.mask}
    for packed in (False, True):
        lp, ent = compute_log_probs([model], layout, shard, pack=packed, **kw)
        train_step([model], layout, shard, algo_cfg=hp, step=3, pack=packed, **kw)
        res[packed] = (lp.double(), ent.double(), {n: p.grad.double().clone() for n, p in model.named_parameters()})
    return res


def _worker(rank: int, world: int, tp: int, pp: int) -> dict[str, Any]:
    import contextlib

    from megacov.parallel import actor, packing
    from megacov.parallel.layout import ParallelLayout

    layout = ParallelLayout.initialize(tp, pp, seed=0)
    try:
        out = {d: _run_variant(layout, d) for d in ("float32", "float64")}
        if tp == pp == 1:
            real, packing.pack = packing.pack, _leaky_pack(packing.pack)
            out["leaky"] = _run_variant(layout, "float64")
            packing.pack = real
            # the rotary table at packed-row positions: float32 angles round differently
            rotary, actor.per_sequence_rotary = actor.per_sequence_rotary, lambda *a: contextlib.nullcontext()
            out["row_rotary"] = _run_variant(layout, "float64")
            actor.per_sequence_rotary = rotary
        return out
    finally:
        layout.destroy()


def _errors(res: dict[str, Any]) -> tuple[float, float, float]:
    (lp0, ent0, g0), (lp1, ent1, g1), keep = res[False], res[True], res["keep"]
    grad = max(float((g1[n] - g0[n]).abs().max()) / max(float(g0[n].abs().max()), 1e-30) for n in g0)
    return float((lp1 - lp0)[keep].abs().max()), float((ent1 - ent0)[keep].abs().max()), grad


@pytest.mark.parametrize("tp,pp,dp", LAYOUTS, ids=[f"{t}x{p}x{d}" for t, p, d in LAYOUTS])
def test_packed_equals_padded(tp: int, pp: int, dp: int) -> None:
    from megacov.parallel.spawn import run_distributed

    results = run_distributed(_worker, tp * pp * dp, tp, pp, timeout_s=300)
    for out in results:
        for dtype_name, tol in (("float32", 1e-6), ("float64", 1e-12)):
            assert out[dtype_name]["keep"].any()
            assert max(_errors(out[dtype_name])) <= tol, (dtype_name, _errors(out[dtype_name]))
        if "leaky" in out:  # the same check fails when sequences see each other
            assert _errors(out["leaky"])[0] > 1e-3, _errors(out["leaky"])
            assert max(_errors(out["row_rotary"])) > 1e-12, _errors(out["row_rotary"])


def test_cli_refuses_a_token_budget_with_the_micro_batch_scope(capsys) -> None:
    from megacov.cli import main

    assert main(["verify", "exactness", "--max-tokens-per-micro-batch", "40", "--scopes", "micro_batch"]) == 2
    assert "--max-tokens-per-micro-batch" in capsys.readouterr().err


@pytest.mark.slow
def test_exactness_with_token_budget_and_packing() -> None:
    """The float64 reference of the whole batch, on token-balanced DP shares of token-budget packed
    micro-batches under megatron DDP: selection, loss, gradients and log-probs all match."""
    from megacov.verify.exactness import RunOptions, Tolerances, run_exactness

    rows = run_exactness(["2x1x2"], [1], ["clip_cov", "kl_cov"], [67], entropy_top=0.2,
                         opts=RunOptions(ddp=True, max_tokens=MAX_TOKENS, pack=True))
    tol = Tolerances()
    assert len(rows) == 4
    for r in rows:
        assert r.ok(tol) and r.n_selected > 0, r
