"""Engine and rank faults in a real run on CPU (real vLLM engine, real Megatron ranks, Ray), killed by
signal from outside, as an OOM killer or a stuck driver would.

* One run whose engine is SIGKILLed after step 1 and whose replacement is SIGSTOPped (wedged) after
  step 2: both are replaced and re-synced, the run finishes with every step, the data position is
  where an uninterrupted run's is, and the train/rollout log-prob gap of the retried steps is as small
  as on a healthy step (a replacement that kept the initial weights would not match the updated actor).
* One run with 2 engines whose engine 1 exits inside ``update_weights`` of step 1's sync (fault drill):
  it alone is replaced, the sync retried, engine 0 keeps its process, the recovery is in the metrics
  and step 2's rollout log-probs match the actor's.
* One run whose Megatron rank is SIGKILLed: one line naming the rank, the call and the last good
  checkpoint; exit 1, without waiting for the surviving rank's collective to time out.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import DIGITS_REWARD

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEDGE_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="megacov", log_to_driver=False,
                   configure_logging=False)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from megacov.tiny import EXAMPLE_MODEL, build_model, write_task_data

    root = tmp_path_factory.mktemp("tiny")
    build_model(str(root / "model"), **EXAMPLE_MODEL)
    (root / "fault_reward_mod.py").write_text(DIGITS_REWARD)
    return {"root": str(root), "model": str(root / "model"),
            **write_task_data(str(root / "data"), n_train=64, n_eval=8)}


def _cli(tiny, ray_address, name, *extra, env_extra=None):
    overrides = [f"model.path={tiny['model']}", f"data.train_files=[{tiny['train']}]", "data.eval_files=[]",
                 "data.sft_files=[]", f"trainer.output_dir={tiny['root']}/runs", f"trainer.name={name}",
                 "trainer.sft_steps=0", "logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false",
                 "data.batch_size=4", "data.mini_batch_size=4", "rollout.n=4", "parallel.micro_batch_size=4",
                 "rollout.max_response_len=6", "rollout.mismatch_sample=16", "trainer.total_steps=3",
                 "checkpoint.save_every=1", "checkpoint.export_hf=false", "optim.lr=1e-2",
                 "reward.name=fault_reward_mod:digits", "reward.workers=0", "algorithm.clip_cov_lb=0.0",
                 f"trainer.ray_address={ray_address}", *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, tiny["root"]]), OMP_NUM_THREADS="1", **(env_extra or {}))
    args = [sys.executable, "-m", "megacov", "train", os.path.join(ROOT, "examples/tiny/config.yaml"), *overrides]
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def _rows(run_dir):
    from megacov.trainer.metrics import read_jsonl

    path = os.path.join(run_dir, "metrics.jsonl")
    return {r["step"]: r for r in read_jsonl(path)} if os.path.exists(path) else {}


def _pids(class_name):
    from ray._private.state import actors

    return sorted(a["Pid"] for a in actors(actor_state_name="ALIVE").values()
                  if class_name in a.get("ActorClassName", "") and a["Pid"])


def _wait(cond, proc, what, timeout_s=400):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) before {what}: {proc.stderr.read().decode()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout_s}s")


def test_engine_sigkill_then_sigstop_are_replaced_resynced_and_the_run_finishes(ray_cluster, tiny):
    from megacov.trainer.checkpoint import load_trainer_state

    run_dir = os.path.join(tiny["root"], "runs", "engine-faults")
    proc = _cli(tiny, ray_cluster, "engine-faults", "parallel.tp=1", "rollout.max_engine_restarts=2",
                f"rollout.generate_timeout_s={WEDGE_TIMEOUT_S}",
                f"rollout.weight_update_timeout_s={WEDGE_TIMEOUT_S}", "trainer.eval_every=0")
    stopped = None
    try:
        first = _wait(lambda: _pids("EngineActor"), proc, "the engine started")
        _wait(lambda: 1 in _rows(run_dir), proc, "step 1")
        os.kill(first[0], signal.SIGKILL)  # the rollout of step 2 meets a dead engine
        killed_at = time.monotonic()
        second = _wait(lambda: [p for p in _pids("EngineActor") if p not in first], proc, "a replacement engine")
        _wait(lambda: 2 in _rows(run_dir), proc, "step 2")
        step2_s = time.monotonic() - killed_at
        stopped = second[0]
        os.kill(stopped, signal.SIGSTOP)  # step 3's rollout (or, if it was done, its sync) meets a wedged engine
        stopped_at = time.monotonic()
        _wait(lambda: 3 in _rows(run_dir), proc, "step 3")
        step3_s = time.monotonic() - stopped_at
        _, err = proc.communicate(timeout=300)
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = err.decode()
    print(f"engine SIGKILL: step 2 done {step2_s:.1f} s after the kill; "
          f"engine SIGSTOP: step 3 done {step3_s:.1f} s after the stop; exit {proc.returncode}")
    assert proc.returncode == 0, log[-3000:]
    # a fault is met by step 2's rollout, or (if the rollout was done) by the liveness check before its sync
    assert re.search(r"engine 0 died during (generate|a liveness check) \(\w+\) in the (rollout of step 2|weight "
                     r"sync): replacing engine 0 \(restart 1 of at most 2\)", log), log[-3000:]
    assert re.search(rf"engine 0 wedged during (generate|a liveness check) \(no answer in {WEDGE_TIMEOUT_S} s\) "
                     r"in the (rollout of step 3|weight sync)", log), log[-3000:]
    assert len(re.findall(r"engine\(s\) \[0\] replaced \(the others kept\)( and synced to weight version \d+)? "
                          r"in [\d.]+ s", log)) == 2
    assert step3_s > WEDGE_TIMEOUT_S  # the deadline fired, nothing else ended the hang
    rows = _rows(run_dir)
    assert sorted(rows) == [1, 2, 3]
    healthy = rows[1]["rollout/logprob_diff_max"]
    assert rows[1]["reward/std"] > 0  # non-zero advantages: the policy moved, a stale replacement would show
    for step in (2, 3):  # rolled out by a replacement: it holds the updated policy, as the actor does
        assert rows[step]["rollout/logprob_diff_max"] < max(1e-3, 10 * healthy), (step, rows[step])
    # nothing lost or repeated: 3 steps x 4 prompts consumed, as in a run without faults
    state = load_trainer_state(os.path.join(run_dir, "checkpoints", "step_00000003"))
    assert state["loader"]["cursor"] == 12 and state["loader"]["epoch"] == 0


def test_engine_dying_inside_a_weight_sync_is_replaced_alone_and_the_run_finishes(ray_cluster, tiny):
    run_dir = os.path.join(tiny["root"], "runs", "sync-fault")
    proc = _cli(tiny, ray_cluster, "sync-fault", "parallel.tp=1", "rollout.engines=2",
                "rollout.placement=disaggregated", "trainer.total_steps=2", "rollout.max_engine_restarts=1",
                f"rollout.weight_update_timeout_s={WEDGE_TIMEOUT_S}", "trainer.eval_every=0",
                env_extra={"MEGACOV_FAULT_ENGINE": "1:update_weights:exit"})
    try:
        seen: set[int] = set()  # every engine process of the run

        def step2():
            seen.update(_pids("EngineActor"))
            return 2 in _rows(run_dir)

        _wait(step2, proc, "step 2")
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = err.decode()
    assert proc.returncode == 0, log[-3000:]
    # step 1's sync: engine 1 exits inside update_weights; it alone is replaced and the sync retried
    assert re.search(r"engine 1 died during update_weights \(\w+\) in the weight sync: replacing engine 1 "
                     r"\(restart 1 of at most 1\)", log), log[-3000:]
    assert re.search(r"engine\(s\) \[1\] replaced \(the others kept\) in [\d.]+ s; retrying the weight sync", log)
    assert re.search(r"engine restart: \[0\] answered in [\d.]+ s; replacing \[1\]", log), log[-3000:]
    assert len(seen) == 3, seen  # the two first engines and one replacement: engine 0 kept its process
    rows = _rows(run_dir)
    assert rows[1]["engine/restarts"] == 1 and rows[1]["engine/replaced"] == 1 and rows[1]["engine/recovery_s"] > 0
    assert rows[2]["engine/restarts"] == 1 and rows[2]["engine/recovery_s"] == 0
    # step 2 is rolled out by the survivor and the replacement, both holding step 1's policy
    assert rows[2]["rollout/logprob_diff_max"] < max(1e-3, 10 * rows[1]["rollout/logprob_diff_max"]), rows[2]


def test_rank_sigkill_ends_the_run_with_one_line_naming_the_last_checkpoint(ray_cluster, tiny):
    run_dir = os.path.join(tiny["root"], "runs", "rank-fault")
    proc = _cli(tiny, ray_cluster, "rank-fault", "parallel.tp=2", "trainer.eval_every=0")
    try:
        ranks = _wait(lambda: [p for p in _pids("RankHost")] if len(_pids("RankHost")) >= 2 else None, proc,
                      "the ranks started")
        _wait(lambda: 1 in _rows(run_dir), proc, "step 1")
        os.kill(ranks[-1], signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = proc.communicate(timeout=300)
        exit_s = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    errors = [ln for ln in err.decode().splitlines() if ln.startswith("megacov: error:")]
    print(f"rank SIGKILL: exit {proc.returncode} {exit_s:.1f} s after the kill: {errors}")
    assert proc.returncode == 1 and len(errors) == 1, err.decode()[-3000:]
    last = errors[0]
    assert re.fullmatch(r"megacov: error: RankFault: actor rank [01] died during \w+ \(\w+\); last good checkpoint: "
                        r"\S+/step_0000000[12] \(the same command resumes from it\) \(traceback in \S+train\.log\)",
                        last), last
    assert 3 not in _rows(run_dir)
    assert exit_s < 120  # the surviving rank's collective is not waited for (gloo's own timeout is 30 min)
