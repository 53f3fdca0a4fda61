"""Faults a long run must survive, on the driver side (no workers): a damaged newest checkpoint, a full
disk during a save, crafted pickles in a checkpoint, SIGTERM / SIGINT, a storm of non-finite updates,
a fresh run in an old run's folder, the order of metrics row and checkpoint commit, fatal errors in
train.log."""
from __future__ import annotations

import errno
import json
import logging
import os
import pickle
from types import SimpleNamespace
import signal

import pytest
import torch

from megacov.config import ConfigError, load_config
from megacov.trainer import faults
from megacov.trainer.checkpoint import (
    MANIFEST,
    CheckpointError,
    CheckpointManager,
    CheckpointSaveError,
    check_manifest,
    load_trainer_state,
)


def _ckpt(mgr, step, payload=b"x" * 1000):
    def shards(tmp):
        os.makedirs(os.path.join(tmp, "actor"))
        with open(os.path.join(tmp, "actor", "__0_0.distcp"), "wb") as fh:
            fh.write(payload)

    return mgr.commit(mgr.stage(step, shards, {"step": step}))


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    mgr = CheckpointManager(str(tmp_path), keep_last=3)
    _ckpt(mgr, 1)
    newest = _ckpt(mgr, 2)
    assert check_manifest(newest) is None and mgr.resolve_resume("auto") == newest
    with open(os.path.join(newest, "actor", "__0_0.distcp"), "r+b") as fh:
        fh.truncate(10)  # a dying file system cut the shard
    with caplog.at_level(logging.WARNING):
        chosen = mgr.resolve_resume("auto")
    assert chosen == mgr.step_dir(1)
    assert "step_00000002 is damaged: actor/__0_0.distcp has 10 bytes" in caplog.text
    assert "falling back to" in caplog.text
    with pytest.raises(CheckpointError, match="damaged"):
        mgr.resolve_resume(newest)  # an explicit path is not silently replaced


def test_flipped_byte_is_caught_by_the_hash_and_no_intact_checkpoint_is_an_error(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=3)
    only = _ckpt(mgr, 1)
    with open(os.path.join(only, "actor", "__0_0.distcp"), "r+b") as fh:
        fh.write(b"y")  # same size, other content
    assert "sha256" in check_manifest(only)
    with pytest.raises(CheckpointError, match="no intact checkpoint.*trainer.overwrite=true"):
        mgr.resolve_resume("auto")


def test_sizes_only_manifest_and_legacy_checkpoint_without_manifest(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=3, with_hashes=False)
    path = _ckpt(mgr, 1)
    with open(os.path.join(path, MANIFEST)) as fh:
        assert "sha256" not in json.load(fh)["files"]["actor/__0_0.distcp"]
    os.remove(os.path.join(path, MANIFEST))
    assert mgr.resolve_resume("auto") == path


@pytest.mark.parametrize("where", ["shards", "driver"])
def test_disk_full_during_save_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch, where):
    mgr = CheckpointManager(str(tmp_path), keep_last=2)
    _ckpt(mgr, 1)

    def full_shards(tmp):
        with open(os.path.join(tmp, "big"), "wb") as fh:
            fh.write(b"partial")
        # what a rank's failure looks like once Ray has carried it to the driver: text only
        raise RuntimeError("ray::ActorWorker.save_checkpoint() ... OSError: [Errno 28] No space left on device")

    def ok_shards(tmp):
        open(os.path.join(tmp, "shard"), "w").close()

    if where == "driver":
        import megacov.trainer.checkpoint as ck

        def enospc(*_a, **_k):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(ck, "_save_driver_rng", enospc)
    with pytest.raises(CheckpointSaveError) as info:
        mgr.stage(2, full_shards if where == "shards" else ok_shards, {"step": 2})
    msg = str(info.value)
    assert "\n" not in msg
    assert "checkpoint of step 2 not saved: no space left on device" in msg
    assert "step_00000001" in msg  # names the last good checkpoint
    assert sorted(os.listdir(mgr.root)) == ["step_00000001"]  # no .tmp-* left behind


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (needs mount rights, e.g. root in a container; skipped otherwise)."""
    import shutil as sh
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if not sh.which("mount") or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                               capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_really_full_disk_leaves_the_previous_checkpoint_and_nothing_else(small_disk):
    mgr = CheckpointManager(small_disk, keep_last=2)
    _ckpt(mgr, 1, payload=b"x" * 1000)
    with pytest.raises(CheckpointSaveError, match="step 2 not saved: no space left on device.*step_00000001"):
        _ckpt(mgr, 2, payload=b"x" * (1 << 20))  # 1 MiB into 256 KiB
    assert sorted(os.listdir(mgr.root)) == ["step_00000001"]
    assert mgr.resolve_resume("auto") == mgr.step_dir(1)


def test_stale_temp_folders_are_removed_on_start(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=2)
    os.makedirs(os.path.join(mgr.root, ".tmp-step_00000007", "actor"))
    assert CheckpointManager(str(tmp_path), keep_last=2).remove_partial() == [".tmp-step_00000007"]
    assert os.listdir(mgr.root) == []


class _Boom:
    """Unpickling this runs a command that leaves a file behind: proof of code execution."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickles_in_a_checkpoint_do_not_execute(tmp_path):
    from megacov.trainer import safe_load
    from megacov.trainer.actor_ckpt import read_rng_file

    marker = tmp_path / "pwned"
    mgr = CheckpointManager(str(tmp_path / "run"), keep_last=2)
    path = _ckpt(mgr, 1)
    # 1. the driver RNG file of older checkpoints (pickle): ignored, never loaded
    with open(os.path.join(path, "driver_rng.pkl"), "wb") as fh:
        pickle.dump(_Boom(marker), fh)
    os.remove(os.path.join(path, "driver_rng.json"))
    load_trainer_state(path)
    # 2. a rank's RNG file: safetensors; a pickle under that name is not valid safetensors
    rng = os.path.join(path, "rng_rank.safetensors")
    torch.save({"x": _Boom(marker)}, rng)
    with pytest.raises(Exception):
        read_rng_file(rng)
    # 3. megatron / torch dist checkpoint metadata and byte entries: allow-listed unpickling only
    safe_load.install()
    from torch.distributed.checkpoint import FileSystemReader

    dcp = tmp_path / "dcp"
    dcp.mkdir()
    with open(dcp / ".metadata", "wb") as fh:
        pickle.dump(_Boom(marker), fh)
    with pytest.raises(safe_load.UnsafeCheckpointError, match="posix.system|os.system"):
        FileSystemReader(str(dcp)).read_metadata()
    import io

    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    buf = io.BytesIO()
    torch.save(_Boom(marker), buf)
    buf.seek(0)
    planner = DefaultLoadPlanner()
    planner.flatten_state_dict = False
    planner.state_dict = {}

    class _Item:
        class dest_index:
            fqn = "obj"

    with pytest.raises(pickle.UnpicklingError):
        planner.load_bytes(_Item, buf)
    assert not marker.exists()


def test_allow_listed_metadata_of_a_real_torch_checkpoint_loads(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter, load, save

    from megacov.trainer import safe_load

    safe_load.install()
    state = {"w": torch.arange(6.0).reshape(2, 3), "obj": (0.1, "cosine", 7)}  # a byte entry
    save(state, storage_writer=FileSystemWriter(str(tmp_path)), no_dist=True)
    out = {"w": torch.zeros(2, 3), "obj": None}
    load(out, storage_reader=FileSystemReader(str(tmp_path)), no_dist=True)
    assert torch.equal(out["w"], state["w"]) and out["obj"] == state["obj"]


def test_rank_rng_file_round_trips_without_pickle(tmp_path):
    import random

    import numpy as np

    from megacov.trainer.actor_ckpt import read_rng_file, write_rng_file

    random.seed(3)
    np.random.seed(3)
    js = {"python": [3, list(random.getstate()[1]), None],
          "numpy": ["MT19937", [int(k) for k in np.random.get_state()[1]], 5, 0, 0.0]}
    tensors = {"torch": torch.get_rng_state(), "tracker/model-parallel-rng": torch.get_rng_state()}
    write_rng_file(str(tmp_path / "r.safetensors"), js, tensors)
    js2, t2 = read_rng_file(str(tmp_path / "r.safetensors"))
    assert js2 == js and all(torch.equal(t2[k], tensors[k]) for k in tensors)


def test_sigterm_and_sigint_become_a_stop_request(caplog):
    stop = faults.StopRequest()
    stop.install()
    try:
        assert not stop.requested
        with caplog.at_level(logging.WARNING):
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
        assert "SIGTERM received" in caplog.text
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler) or \
        signal.getsignal(signal.SIGTERM) is not stop._handle


class _FakeCtx:
    """What :func:`megacov.trainer.loop.rl_loop` needs, with a stop request arriving mid-step 2."""

    def __init__(self, stop, total=5):
        self.cfg = load_config(None, [f"trainer.total_steps={total}", "trainer.eval_every=0"])
        self.start_step, self.eval_sets, self.stop = 0, {}, stop
        self.events = []

        class _Loader:
            epochs_done = 0

        self.loader = _Loader()

    def log(self, step, metrics):
        self.events.append(("row", step))

    def stop_requested(self, step):
        if self.stop.requested:
            self.events.append(("save", step))
            return True
        return False


def test_loop_stops_at_the_safe_point_after_the_row(monkeypatch):
    from megacov.trainer import loop

    stop = faults.StopRequest()
    ctx = _FakeCtx(stop)

    def step_fn(c, step):
        if step == 2:
            stop._handle(signal.SIGTERM, None)  # preemption arrives in the middle of step 2
        return {"actor/skipped_updates": 0.0}

    monkeypatch.setattr(loop, "rl_step", step_fn)
    assert loop.rl_loop(ctx) == 2
    assert ctx.events == [("row", 1), ("row", 2), ("save", 2)]


def test_nan_storm_warns_every_skip_and_stops_after_k(caplog):
    guard = faults.NonFiniteGuard(max_steps=3, updates_per_step=2)
    with caplog.at_level(logging.WARNING):
        guard.observe(1, {"actor/skipped_updates": 0.0})
        guard.observe(2, {"actor/skipped_updates": 1.0, "reward/mean": 1e308})
        guard.observe(3, {"actor/skipped_updates": 0.0})  # a clean step resets the count
        guard.observe(4, {"actor/skipped_updates": 2.0})
        guard.observe(5, {"actor/skipped_updates": 2.0})
        with pytest.raises(faults.NonFiniteStorm, match="stopped at step 6.*3 consecutive steps.*was 3"):
            guard.observe(6, {"actor/skipped_updates": 2.0})
    warned = [r for r in caplog.records if "skipped because the loss or gradients were not finite" in r.message]
    assert [r.message.split(":")[0] for r in warned] == ["step 2", "step 4", "step 5", "step 6"]
    only_warn = faults.NonFiniteGuard(max_steps=0, updates_per_step=1)
    for step in range(1, 20):
        only_warn.observe(step, {"actor/skipped_updates": 1.0})


def test_fresh_run_in_an_old_runs_folder_refuses_unless_told(tmp_path):
    from megacov.trainer.startup import prepare_run_dir

    run = tmp_path / "run"
    mgr = CheckpointManager(str(run), keep_last=2)
    _ckpt(mgr, 40)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "train.log").write_text("old\n")
    with pytest.raises(ConfigError, match="already holds a run.*step_00000040.*metrics.jsonl.*trainer.resume=auto"):
        prepare_run_dir(str(run), "never", overwrite=False)
    with pytest.raises(ConfigError, match="overwrite=true needs trainer.resume=never"):
        prepare_run_dir(str(run), "auto", overwrite=True)
    prepare_run_dir(str(run), "auto", overwrite=False)  # continuing is what auto means
    prepare_run_dir(str(run), mgr.step_dir(40), overwrite=False)  # one of its own checkpoints
    prepare_run_dir(str(run), "never", overwrite=True)
    assert sorted(os.listdir(run)) == ["train.log"]
    prepare_run_dir(str(run), "never", overwrite=False)  # nothing left to clobber


def test_metrics_row_is_on_disk_before_the_checkpoint_commits(tmp_path):
    from megacov.trainer.metrics import MetricsLogger, read_jsonl
    from megacov.trainer.run import RunContext
    from megacov.runtime.recovery import EngineRecovery

    cfg = load_config(None, ["logging.progress_bar=false", "logging.tensorboard=false", "trainer.total_steps=5"])
    ctx = RunContext.__new__(RunContext)
    ctx.cfg, ctx.run_dir = cfg, str(tmp_path)
    ctx.metrics = MetricsLogger(str(tmp_path), cfg.logging, run_name="t", total_steps=5)
    ctx.guard = faults.NonFiniteGuard(3, 1)
    ctx.recovery = EngineRecovery(None, 0, lambda: None)
    seen = []

    class _Mgr:
        def commit(self, staged):
            seen.append([r["step"] for r in read_jsonl(os.path.join(str(tmp_path), "metrics.jsonl"))])

    ctx.ckpt, ctx._staged = _Mgr(), object()
    ctx.log(3, {"reward/mean": 0.5})
    ctx.metrics.close()
    assert seen == [[3]] and ctx._staged is None


def test_fatal_errors_reach_train_log_as_one_line(tmp_path):
    def body():
        raise RuntimeError("engine exploded\nwith a long remote traceback")

    with pytest.raises(faults.RunFailed) as info:
        faults.guarded(str(tmp_path), body, (ValueError,), lambda e: ConfigError(str(e)))
    assert "\n" not in str(info.value) and "RuntimeError: engine exploded" in str(info.value)
    text = (tmp_path / "train.log").read_text()
    assert "run failed: RuntimeError: engine exploded" in text and "Traceback" in text

    def bad():
        raise ValueError("data.train_files: x.jsonl: row 3: invalid JSON")

    with pytest.raises(ConfigError, match="row 3"):
        faults.guarded(str(tmp_path), bad, (ValueError,), lambda e: ConfigError(str(e)))
    assert "row 3" in (tmp_path / "train.log").read_text()


def test_wandb_run_id_is_stored_and_reused_on_resume(tmp_path):
    from megacov.trainer.metrics import wandb_run_id

    first = wandb_run_id(str(tmp_path), resuming=False)
    assert wandb_run_id(str(tmp_path), resuming=True) == first
    assert wandb_run_id(str(tmp_path), resuming=False) != first  # a fresh run is a new W&B run


def test_hf_export_every_n_steps(tmp_path, monkeypatch):
    from megacov.runtime.recovery import EngineRecovery
    from megacov.trainer import session
    from megacov.trainer.run import RunContext

    exported = []
    monkeypatch.setattr(session, "export_hf", lambda group, src, out: exported.append(out) or out)
    cfg = load_config(None, ["trainer.total_steps=4", "checkpoint.export_hf_every=2"])
    ctx = RunContext.__new__(RunContext)
    ctx.cfg, ctx.run_dir, ctx.init_path, ctx._staged = cfg, str(tmp_path), "init", None
    ctx.runtime = SimpleNamespace(actor=None)
    ctx.guard = faults.NonFiniteGuard(3, 1)
    ctx.recovery = EngineRecovery(None, 0, lambda: None)

    class _Sink:
        def log(self, step, metrics):
            pass

        progress = log

    ctx.metrics = _Sink()
    for step in range(1, 5):
        ctx.log(step, {})
    assert exported == [os.path.join(str(tmp_path), "hf_exports", "step_00000002")]  # step 4: the final export
    cfg.checkpoint.export_hf = False
    ctx.log(4, {})
    assert exported[-1].endswith("step_00000004")
