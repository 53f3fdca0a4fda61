"""One update step of a real megatron GPT under TP x PP x DP layouts vs a float64 reference.

Each layout is one spawned gloo world that runs every case (ppo / clip_cov / kl_cov, 1 or 4
micro-batches per DP rank, cov_scope global / micro_batch / global_old, a vocabulary that TP=2
must pad and one it need not) through :func:`megacov.parallel.actor.train_step`. The reference is a
plain float64 forward of the same weights with the pure algorithm functions on the whole batch.
"""
from __future__ import annotations

import os

import pytest
import torch

from megacov.parallel.exactness import (
    Case,
    RunOptions,
    TinySpec,
    Tolerances,
    case_hparams,
    full_weights,
    make_batch,
    reference_forward,
    reference_step,
    run_exactness,
)

os.environ.setdefault("OMP_NUM_THREADS", "1")

SELECTING = ("clip_cov", "kl_cov")
EXTRA = [Case("clip_cov", 4, "micro_batch"), Case("kl_cov", 4, "micro_batch"), Case("clip_cov", 4, "global_old"),
         Case("kl_cov", 1, "global_old")]


def _check(rows, tol: Tolerances, expected: int) -> None:
    assert len(rows) == expected
    for r in rows:
        assert r.selected_equal, r
        assert r.loss_rel <= tol.loss, r
        assert r.grad_rel <= tol.grad, r
        assert r.logp_abs <= tol.logp and r.entropy_abs <= tol.logp, r
        if r.case.split("/")[0] in SELECTING:
            assert r.n_selected > 0, r


def test_cli_single_process_float64(capsys):
    """megacov verify exactness at 1x1x1 in float64: megatron agrees with the plain reference to
    rounding, which validates the reference the layout tests rely on."""
    from megacov.cli import main

    code = main(["verify", "exactness", "--layouts", "1x1x1", "--micro-batches", "4", "--loss",
                 "clip_cov,kl_cov", "--vocab-size", "67", "--dtype", "float64"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "2/2 cases match" in out
    assert out.count(" yes") == 2


@pytest.mark.parametrize("argv,message", [
    (["--layouts", "2x2"], "TPxPPxDP"),
    (["--loss", "nope"], "unknown --loss"),
    (["--scopes", "everywhere"], "unknown --scopes"),
    (["--ddp", "--dtype", "float64"], "--ddp"),
])
def test_cli_bad_input_exits_2(argv, message, capsys):
    from megacov.cli import main

    assert main(["verify", "exactness", *argv]) == 2
    assert message in capsys.readouterr().err


def test_micro_batch_scope_is_the_reference_approximation():
    """Per-micro-batch selection (what the reference implementation does) picks other tokens than
    the whole mini-batch as soon as there is more than one micro-batch: the problem solved here."""
    spec = TinySpec(vocab=67)
    w = full_weights(spec, 0)
    batch = make_batch(spec, w, batch_size=8, seq_len=32, seed=0, temperature=0.9)
    for loss in SELECTING:
        glob = reference_step(w, spec, batch, case_hparams(Case(loss, 4)), step=3, temperature=0.9, dp=1,
                              micro_batches=4)
        per_mb = reference_step(w, spec, batch, case_hparams(Case(loss, 4, "micro_batch")), step=3,
                                temperature=0.9, dp=1, micro_batches=4)
        one_mb = reference_step(w, spec, batch, case_hparams(Case(loss, 1, "micro_batch")), step=3,
                                temperature=0.9, dp=1, micro_batches=1)
        assert per_mb["selected_ids"] != glob["selected_ids"]
        assert one_mb["selected_ids"] == glob["selected_ids"]
        assert abs(per_mb["loss"] - glob["loss"]) > 1e-6


def test_reference_is_causal_and_ignores_padded_rows():
    spec = TinySpec(vocab=67)
    w = full_weights(spec, 1)
    ids = torch.randint(0, 67, (2, 10), generator=torch.Generator().manual_seed(0))
    base = reference_forward(w, spec, ids)
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 67
    assert torch.equal(reference_forward(w, spec, changed)[:, :6], base[:, :6])
    assert not torch.allclose(reference_forward(w, spec, changed)[:, 6:], base[:, 6:])


LAYOUTS = [
    # (layout, options, tolerances): fp32 as in training, checked against float64 with the stated
    # tolerances; one run in float64, where any parallel error would stand out above ~1e-14.
    ("2x2x1", RunOptions(dtype_name="float32"), Tolerances()),
    ("2x1x2", RunOptions(dtype_name="float32", ddp=True), Tolerances()),
    ("1x2x2", RunOptions(dtype_name="float64"), Tolerances.for_dtype("float64")),
]


@pytest.mark.slow
@pytest.mark.parametrize("layout,opts,tol", LAYOUTS, ids=[x[0] + ("-ddp" if x[1].ddp else "") + "-" + x[1].dtype_name
                                                          for x in LAYOUTS])
def test_layout_matches_float64_reference(layout, opts, tol):
    rows = run_exactness([layout], [1, 4], ["ppo", "clip_cov", "kl_cov"], [67, 64], opts=opts, extra_cases=EXTRA)
    _check(rows, tol, expected=2 * (6 + len(EXTRA)))
