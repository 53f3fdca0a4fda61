"""tools/launch/slurm.sbatch on a real, private, single-node SLURM cluster.

The test starts its own munged, slurmctld and slurmd (Debian's slurm-wlm 22.05: apt-get install
slurmctld slurmd slurm-client munge) with state, sockets and ports of its own, declares eight GPUs
as countable resources without devices, and submits the launcher exactly as a user would. The
training command is `megacov train ... --dry-run`, so the job exercises everything the launcher does
(head start, readiness wait, driver step with RAY_ADDRESS, per-node logs, clean shutdown) without
GPUs. One node only: Debian's slurmd cannot pose as several nodes on one host; the multi-node Ray
path is covered by tests/test_cluster_multinode.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(REPO, "tools", "launch", "slurm.sbatch")
EXAMPLE = os.path.join(REPO, "examples", "cluster", "qwen2.5-32b-klcov.yaml")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")
QWEN32B_SHAPE = {"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 64, "num_attention_heads": 40,
                 "num_key_value_heads": 8, "vocab_size": 152064, "hidden_size": 5120}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _which(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}")
                                        if os.access(p, os.X_OK)), None)


def _slurm_conf(root: str, host: str, ctl_port: int, d_port: int) -> str:
    return f"""ClusterName=megacovtest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/sock
CredType=cred/munge
SlurmctldPort={ctl_port}
SlurmdPort={d_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=10
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory=1000 Gres=gpu:8 State=UNKNOWN
PartitionName=main Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _read_pid(path: str) -> int:
    try:
        with open(path) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return -1


def _kill_pidfile(path: str) -> None:
    pid = _read_pid(path)
    if pid > 0:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


@contextlib.contextmanager
def private_slurm() -> Iterator[dict[str, str]]:
    root = tempfile.mkdtemp(prefix="mc_slurm_")
    host = socket.gethostname().split(".")[0]
    for sub in ("munge", "state", "spool", "fakegpu"):
        os.makedirs(os.path.join(root, sub), mode=0o700)
    for i in range(8):  # GPUs SLURM can count and hand out; nothing here opens them
        open(os.path.join(root, "fakegpu", f"gpu{i}"), "w").close()
    with open(os.path.join(root, "munge", "key"), "wb") as fh:
        fh.write(os.urandom(1024))
    os.chmod(os.path.join(root, "munge", "key"), 0o400)
    conf = os.path.join(root, "slurm.conf")
    with open(conf, "w") as fh:
        fh.write(_slurm_conf(root, host, _free_port(), _free_port()))
    with open(os.path.join(root, "gres.conf"), "w") as fh:
        fh.write(f"NodeName={host} Name=gpu File={root}/fakegpu/gpu[0-7]\n")
    env = dict(os.environ, SLURM_CONF=conf)
    m = os.path.join(root, "munge")
    try:
        subprocess.run([_which("munged"), f"--key-file={m}/key", f"--socket={m}/sock", f"--pid-file={m}/pid",
                        f"--log-file={m}/log", f"--seed-file={m}/seed", "--force"],
                       check=True, env=env, timeout=30)
        subprocess.run([_which("slurmctld"), "-f", conf, "-i"], check=True, env=env, timeout=30)
        subprocess.run([_which("slurmd"), "-f", conf], check=True, env=env, timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env)
            if out.stdout.strip() == "idle":
                break
            subprocess.run(["scontrol", "update", f"nodename={host}", "state=resume"],
                           capture_output=True, env=env)
            time.sleep(1)
        else:
            with open(os.path.join(root, "slurmctld.log")) as fh:
                raise AssertionError("private SLURM did not become ready:\n" + fh.read()[-3000:])
        yield {"root": root, "SLURM_CONF": conf}
    finally:
        # Job steps (slurmstepd) report to slurmd when they end: let them, then stop the daemons,
        # then end whatever of this cluster is still there (found by its private SLURM_CONF).
        marker = f"SLURM_CONF={conf}".encode()
        pidfiles = [os.path.join(root, f) for f in ("slurmd.pid", "slurmctld.pid", "munge/pid")]
        daemons = {_read_pid(f) for f in pidfiles}
        deadline = time.monotonic() + 30
        while set(_pids_with_env(marker)) - daemons and time.monotonic() < deadline:
            time.sleep(1)
        for pidfile in pidfiles:
            _kill_pidfile(pidfile)
        time.sleep(1)
        for pid in _pids_with_env(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def _pids_with_env(marker: bytes) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    if marker in fh.read().split(b"\0"):
                        pids.append(int(entry))
    return pids


def _our_processes(marker: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
                with open(f"/proc/{entry}/stat") as fh:
                    zombie = fh.read().rsplit(")", 1)[1].split()[0] == "Z"
                if marker in cmd and not zombie:
                    found.append(f"{entry}: {cmd[:150]}")
    return found


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sbatch_launcher_runs_head_driver_and_cleans_up(tmp_path):
    missing = [d for d in DAEMONS if _which(d) is None]
    if missing:
        pytest.skip(f"SLURM not installed ({', '.join(missing)}): "
                    f"apt-get install slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        pytest.skip("a private slurmd must run as root")
    pytest.importorskip("ray")
    model = tmp_path / "qwen32b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN32B_SHAPE))
    rows = tmp_path / "train.jsonl"  # the dry run reads the data files; the example's are not here
    rows.write_text('{"prompt": "1+1?", "reward_model": "2"}\n')
    ray_tmp = tempfile.mkdtemp(prefix="mcsl", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
    logs = tmp_path / "logs"
    with private_slurm() as slurm, contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, ray_tmp, True)
        env = dict(os.environ, SLURM_CONF=slurm["SLURM_CONF"], MEGACOV_LOG_DIR=str(logs),
                   RAY_PORT=str(_free_port()), RAY_CLIENT_PORT=str(_free_port()), RAY_TMPDIR=ray_tmp,
                   OMP_NUM_THREADS="1",
                   RAY_USAGE_STATS_ENABLED="0",
                   PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
                   PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("RAY_ADDRESS", None)
        out_file = tmp_path / "job.out"
        sub = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=8",
                              f"--output={out_file}", SBATCH, EXAMPLE, f"model.path={model}",
                              f"data.train_files={rows}", "data.eval_files=[]", "--dry-run"],
                             capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
        assert sub.returncode == 0, sub.stderr
        job = sub.stdout.strip().split(";")[0]
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            q = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True,
                               env=env)
            if not q.stdout.strip():
                break
            time.sleep(2)
        else:
            subprocess.run(["scancel", job], env=env)
            pytest.fail("the job did not finish within 420 s:\n" + out_file.read_text())
        job_out = out_file.read_text()
        host = socket.gethostname().split(".")[0]
        train_log = (logs / "train.log").read_text()
        head_log = (logs / f"ray-head-{host}.log").read_text()
        leftovers = _our_processes(ray_tmp)
    print(job_out)
    assert "Ray head is up" in job_out and "training finished" in job_out, job_out
    # the driver reached the cluster as a Ray client over TCP, with token authentication on
    assert "driver connects to ray://" in job_out and "Ray token authentication on" in job_out, job_out
    assert "stopping 1 Ray node step(s) (exit status 0)" in job_out, job_out
    assert "1 Ray node(s) alive" in train_log and "GPUs=8" in train_log, train_log
    assert "config, layout, reward and data OK" in train_log and "8 x 2 x 2" in train_log, train_log
    assert "memory per GPU" in train_log and "memory: fits" in train_log, train_log
    assert "Ray runtime started" in head_log
    assert not leftovers, leftovers
