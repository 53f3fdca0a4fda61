"""One update step of a real megatron GPT under TP x PP x DP layouts vs a float64 reference.

Each layout is one spawned gloo world that runs every case (every registered policy loss, with
and without the high-entropy tokens, 1 or 4 micro-batches per DP rank, cov_scope global /
micro_batch / global_old, a vocabulary that TP=2 must pad and one it need not) through
:func:`megacov.parallel.actor.train_step`. The reference is a plain float64 forward of the same
weights with the pure algorithm functions on the whole batch. The mutation tests break one
component on purpose and require the check to fail, naming the check that caught it.
"""
from __future__ import annotations

import os

import pytest
import torch

from megacov.algorithms import list_policy_losses
from megacov.verify.exactness import (
    MUTATIONS,
    Case,
    RunOptions,
    TinySpec,
    Tolerances,
    case_hparams,
    full_weights,
    make_batch,
    reference_forward,
    reference_choice,
    reference_logprobs,
    reference_step,
    run_exactness,
    teeth_problems,
)

os.environ.setdefault("OMP_NUM_THREADS", "1")

SELECTING = ("clip_cov", "kl_cov")
EXTRA = [Case("clip_cov", 4, "micro_batch"), Case("kl_cov", 4, "micro_batch"), Case("clip_cov", 4, "global_old"),
         Case("kl_cov", 1, "global_old"), Case("gspo", 1), Case("cispo", 4), Case("ppo", 4, entropy_top=0.2),
         Case("clip_cov", 1, entropy_top=0.2), Case("kl_cov", 4, "micro_batch", entropy_top=0.2),
         Case("gspo", 4, entropy_top=0.2)]


def _check(rows, tol: Tolerances, expected: int) -> None:
    assert len(rows) == expected
    for r in rows:
        assert r.selected_equal, r
        assert r.loss_rel <= tol.loss, r
        assert r.grad_rel <= tol.grad, r
        assert r.logp_abs <= tol.logp and r.entropy_abs <= tol.logp, r
        if r.case.split("/")[0].split("+")[0] in SELECTING:
            assert r.n_selected > 0, r
        if "+he" in r.case:
            assert r.n_he > 0, r


def test_cli_single_process_float64(capsys):
    """megacov verify exactness at 1x1x1 in float64: megatron agrees with the plain reference to
    rounding, which validates the reference the layout tests rely on."""
    from megacov.cli import main

    code = main(["verify", "exactness", "--layouts", "1x1x1", "--micro-batches", "4", "--loss",
                 "clip_cov,cispo", "--vocab-size", "67", "--dtype", "float64"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "4/4 cases match" in out  # clip_cov, cispo, and both with the high-entropy tokens
    assert out.count(" yes") == 4


@pytest.mark.parametrize("argv,message", [
    (["--layouts", "2x2"], "TPxPPxDP"),
    (["--loss", "nope"], "unknown --loss"),
    (["--scopes", "everywhere"], "unknown --scopes"),
    (["--ddp", "--dtype", "float64"], "--ddp"),
    (["--entropy-top-ratio", "1.5"], "--entropy-top-ratio"),
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


def test_batch_tells_the_scopes_apart():
    """The check's batch: for every rule, the whole-batch choice differs from the choice on old
    log-probs, per micro-batch, per DP shard and with rank-local centring (else a layout using one
    of those would pass), for every vocabulary the tests and the CLI use."""
    cases = [Case(lo, 1) for lo in list_policy_losses()] + [Case("ppo", 1, entropy_top=0.2)]
    for vocab in (67, 64, 1001):
        spec = TinySpec(vocab=vocab)
        w = full_weights(spec, 0)
        batch = make_batch(spec, w, batch_size=7, seq_len=32, seed=0, temperature=0.9)
        assert teeth_problems(w, spec, batch, cases, step=3, temperature=0.9) == []


def test_teeth_check_rejects_a_weak_batch():
    """With old log-probs equal to the current ones, global and global_old agree: the tool says so."""
    spec = TinySpec(vocab=67)
    w = full_weights(spec, 0)
    batch = make_batch(spec, w, batch_size=7, seq_len=32, seed=0, temperature=0.9, old_noise=0.0)
    problems = teeth_problems(w, spec, batch, [Case("kl_cov", 1)], step=3, temperature=0.9)
    assert any("global_old" in p for p in problems), problems


def test_reference_choice_matches_the_loss_selection():
    """reference_choice (the teeth check's) and the loss's own whole-batch choice agree."""
    spec = TinySpec(vocab=67)
    w = full_weights(spec, 0)
    batch = make_batch(spec, w, batch_size=7, seq_len=32, seed=0, temperature=0.9)
    lp, ent = reference_logprobs(w, spec, batch.input_ids, 0.9)
    for case, rule, key in [(Case("clip_cov", 1), "clip_cov", "selected_ids"),
                            (Case("kl_cov", 1), "kl_cov", "selected_ids"),
                            (Case("ppo", 1, entropy_top=0.2), "high_entropy", "he_selected_ids")]:
        ref = reference_step(w, spec, batch, case_hparams(case), step=3, temperature=0.9, dp=1, micro_batches=1)
        assert reference_choice(rule, case_hparams(case), batch, lp.detach(), ent.detach(), 3) == ref[key]
        mb = reference_step(w, spec, batch, case_hparams(Case(case.loss, 3, "micro_batch", case.entropy_top)),
                            step=3, temperature=0.9, dp=1, micro_batches=3)
        assert reference_choice(rule, case_hparams(case), batch, lp.detach(), ent.detach(), 3,
                                scope="micro_batch", micro_batches=3) == mb[key]


# (mutation, layout, cases, the checks that must fail on every row)
MUTANTS = [
    ("old_log_probs_in_global", "1x1x1", [Case("clip_cov", 1), Case("kl_cov", 1)], {"selected"}),
    ("rank_local_centring", "1x1x2", [Case("clip_cov", 1), Case("kl_cov", 1)], {"selected"}),
    ("micro_batch_quantile", "1x1x1", [Case("ppo", 3, entropy_top=0.2), Case("gspo", 3, entropy_top=0.2)],
     {"he_selected", "loss", "grad"}),
]


@pytest.mark.parametrize("mutation,layout,cases,caught_by", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_mutation_is_caught(mutation, layout, cases, caught_by):
    """A deliberately broken component makes the check fail, on the checks named."""
    assert mutation in MUTATIONS
    tol = Tolerances()
    rows = run_exactness([layout], [], [], [67], extra_cases=cases, opts=RunOptions(mutation=mutation))
    assert len(rows) == len(cases)
    for r in rows:
        failed = set(r.failed_checks(tol))
        print(f"{mutation} {layout} {r.case}: caught by {sorted(failed)}")
        assert caught_by <= failed, (r, failed)
