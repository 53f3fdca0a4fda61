"""Engine and rank faults, driver side: the retry/replace policy of EngineRecovery and the one-line
errors (the processes themselves are killed for real in tests/test_trainer_engine_faults.py)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from megacov.runtime.recovery import EngineFault, EngineRecovery, RankFault


class FakeRuntime:
    def __init__(self, fail_restarts=()):
        self.restarts = 0
        self.calls = []
        self.fail_restarts = list(fail_restarts)
        self.weight_sync = SimpleNamespace(version=0)
        self.engines_replaced = 0

    def restart_engines(self, faulty, catch_up=True):
        self.restarts += 1
        self.calls.append((list(faulty), catch_up))
        self.engines_replaced += len(faulty)
        if self.fail_restarts:
            raise self.fail_restarts.pop(0)
        return list(faulty)


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
    assert rt.calls == [([0], True), ([0], True)]  # only the named engine, caught up to the current weights
    assert consumed == [4, 4, 4]  # every retry starts from the same data position
    m = rec.step_metrics()
    assert m["engine/restarts"] == 2 and m["engine/replaced"] == 2 and m["engine/recovery_s"] >= 0
    assert rec.step_metrics()["engine/recovery_s"] == 0.0  # seconds are per step, counts cumulative


def test_a_fault_during_the_replacement_costs_another_restart_and_the_sync_is_not_caught_up():
    rt = FakeRuntime(fail_restarts=[EngineFault("engine 1", "update_weights", "died", "ActorDiedError")])
    faults = [EngineFault("engine 0, engine 1", "update_weights", "wedged", "no answer in 5 s")]

    def sync():
        if faults:
            raise faults.pop(0)
        return "synced"

    rec = EngineRecovery(rt, max_restarts=2, last_checkpoint=lambda: None)
    assert rec.run("the weight sync", sync, catch_up=False) == "synced"
    assert rt.calls == [([0, 1], False), ([1], False)]
    assert rec.restarts == 2 and rec.replaced == 3  # engines 0 and 1, then engine 1 again


def test_engine_faults_survive_pickling_and_are_found_behind_other_errors():
    import pickle

    from megacov.runtime.recovery import find_fault

    fault = EngineFault("engine 2", "update_weights", "died", "ActorDiedError", "note")
    back = pickle.loads(pickle.dumps(fault))
    assert (back.who, back.call, back.kind, back.detail, back.note, str(back)) == (
        fault.who, fault.call, fault.kind, fault.detail, fault.note, str(fault))
    assert back.engines == [2]
    try:
        try:
            raise fault
        except EngineFault as exc:
            raise RuntimeError("sync failed") from exc
    except RuntimeError as outer:
        assert find_fault(outer) is fault
    assert find_fault(ValueError("x")) is None


def test_fault_drill_spec_selects_engine_and_incarnation():
    from megacov.rollout.engine import planned_faults

    spec = "1:update_weights:exit, 0.1:start_weight_update:hang"
    assert planned_faults(spec, 1, 0) == {"update_weights": "exit"}
    assert planned_faults(spec, 1, 1) == {}
    assert planned_faults(spec, 0, 1) == {"start_weight_update": "hang"}
    with pytest.raises(ValueError, match="MEGACOV_FAULT_ENGINE: 'x:y' is not"):
        planned_faults("x:y", 0, 0)


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
