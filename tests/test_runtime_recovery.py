"""Engine and rank faults, driver side: the retry/replace policy of EngineRecovery and the one-line
errors (the processes themselves are killed for real in tests/test_trainer_engine_faults.py)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from megacov.runtime.recovery import EngineFault, EngineRecovery, RankFault


class FakeRuntime:
    def __init__(self):
        self.restarts = 0
        self.weight_sync = SimpleNamespace(version=0)

    def restart_engines(self):
        self.restarts += 1
        self.weight_sync.version += 1


def test_engine_fault_replaces_the_engines_and_redoes_the_work_from_the_same_position():
    rt, consumed, position = FakeRuntime(), [], {"cursor": 0}
    failures = [EngineFault("engine 0", "generate", "died", "ActorDiedError"),
                EngineFault("engine 0", "generate", "wedged", "no answer in 5 s")]

    def work():
        position["cursor"] += 4  # the attempt consumed prompts
        consumed.append(position["cursor"])
        if failures:
            raise failures.pop(0)
        return "rollout"

    rec = EngineRecovery(rt, max_restarts=3, last_checkpoint=lambda: "ckpt/step_1")
    assert rec.run("the rollout of step 2", work, before_retry=lambda: position.update(cursor=0)) == "rollout"
    assert rt.restarts == rec.restarts == 2 and len(rec.seconds) == 2
    assert consumed == [4, 4, 4]  # every retry starts from the same data position


def test_restarts_are_bounded_and_the_last_fault_names_engine_and_checkpoint():
    rt = FakeRuntime()

    def work():
        raise EngineFault("engine 1", "score", "wedged", "no answer in 5 s")

    rec = EngineRecovery(rt, max_restarts=1, last_checkpoint=lambda: "runs/x/checkpoints/step_00000002")
    with pytest.raises(EngineFault) as err:
        rec.run("the evaluation", work)
    assert rt.restarts == 1
    msg = str(err.value)
    assert msg.startswith("engine 1 wedged during score")
    assert "rollout.max_engine_restarts=1" in msg and "step_00000002" in msg and "\n" not in msg


def test_other_errors_and_rank_faults_are_not_retried():
    rt = FakeRuntime()
    rec = EngineRecovery(rt, max_restarts=3, last_checkpoint=lambda: None)
    for exc in (ValueError("bad reward"), RankFault("actor rank 1", "update", "died", "ActorDiedError")):
        def work(exc=exc):
            raise exc

        with pytest.raises(type(exc)):
            rec.run("x", work)
    assert rt.restarts == 0


def test_rank_fault_names_the_last_checkpoint_even_behind_a_sync_error():
    from megacov.rollout.buckets import SyncError
    from megacov.trainer.run import rank_guard

    shut = []
    ctx = SimpleNamespace(ckpt=SimpleNamespace(latest=lambda: "runs/x/checkpoints/step_00000004"),
                          actor=SimpleNamespace(shutdown=lambda timeout_s: shut.append(timeout_s)))

    def body():
        try:
            raise RankFault("actor rank 1", "send_weights", "died", "ActorDiedError")
        except RankFault as exc:
            raise SyncError("weight sync failed") from exc

    with pytest.raises(RankFault) as err:
        rank_guard(ctx, body)
    assert str(err.value) == ("actor rank 1 died during send_weights (ActorDiedError); last good checkpoint: "
                              "runs/x/checkpoints/step_00000004 (the same command resumes from it)")
    assert shut == [1.0]  # the surviving ranks are killed, not waited for

    def other():
        raise ValueError("not a rank fault")

    with pytest.raises(ValueError):
        rank_guard(ctx, other)
    ctx.ckpt.latest = lambda: None
    with pytest.raises(RankFault, match="no checkpoint saved yet"):
        rank_guard(ctx, lambda: (_ for _ in ()).throw(RankFault("actor rank 0", "update", "wedged", "no answer")))
