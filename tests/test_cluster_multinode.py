"""A real two-node Ray cluster on one machine, and a gloo all-reduce whose rendezvous crosses nodes.

Each node is a ``ray start`` process (started by ``docker/ray-node.sh``, as in the compose cluster)
in its own network namespace with its own address, joined by a veth pair, so the only way rank 1
reaches rank 0 is the way a second machine would: over rank 0's routable IP. Where network
namespaces cannot be made (not root, no ``ip``), the two nodes share the loopback device with
distinct addresses (127.0.0.2 and 127.0.0.3) and distinct node ids, and the output says so.

The work done on the cluster is a *payload*: a function ``payload(nodes) -> dict`` that the driver
runs after joining. :func:`allreduce_payload` is the one tested here; a payload that runs a few
training steps can be passed to :func:`run_payload_on_two_nodes` the same way.

The file doubles as the driver script: ``python tests/test_cluster_multinode.py --payload SPEC``
(run inside the head's namespace by the harness) prints the payload's JSON result on its last line.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY_NODE_SCRIPT = os.path.join(REPO, "docker", "ray-node.sh")
RESULT_PREFIX = "MEGACOV_PAYLOAD_RESULT "
NODE_START_TIMEOUT_S = 120
OBJECT_STORE_BYTES = 100 * 1024 * 1024
STOP_GRACE_S = 5


# ----------------------------------------------------------------------------------------------
# payloads (run in the driver process, connected to the cluster)
# ----------------------------------------------------------------------------------------------

def _rank_actor_class() -> type:
    """Defined lazily so that importing this file (pytest collection) does not import Ray."""
    import ray

    from megacov.workers.cluster import RendezvousMixin, collective_env

    @ray.remote(num_cpus=1)
    class Rank(RendezvousMixin):
        def allreduce(self, ip: str, port: int, rank: int, world: int) -> dict[str, Any]:
            import torch
            import torch.distributed as dist

            info = self.node_info()
            os.environ.update(collective_env(info["ip"]))
            dist.init_process_group("gloo", init_method=f"tcp://{ip}:{port}", rank=rank,
                                    world_size=world)
            try:
                # Distinct per rank so a reduce that skipped a rank cannot give the expected sum.
                t = torch.arange(4, dtype=torch.float64) * (rank + 1) + 10.0 ** rank
                dist.all_reduce(t)
                peer = dist.get_world_size()
            finally:
                dist.destroy_process_group()
            return {"rank": rank, "sum": t.tolist(), "world": peer, **info,
                    "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME")}

    return Rank


def allreduce_payload(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """One actor pinned to each node (by node id), rendezvous via rank 0's node, gloo all_reduce."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from megacov.workers.cluster import rendezvous_address

    rank_cls = _rank_actor_class()
    ordered = sorted(nodes, key=lambda n: n["NodeManagerAddress"])  # head (lower IP) is rank 0
    actors = [rank_cls.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
              .remote() for n in ordered]
    placed = ray.get([a.node_info.remote() for a in actors], timeout=120)
    ip, port = rendezvous_address(actors)
    world = len(actors)
    reduced = ray.get([a.allreduce.remote(ip, port, r, world) for r, a in enumerate(actors)], timeout=120)
    return {"nodes": [{"node_id": n["NodeID"], "ip": n["NodeManagerAddress"]} for n in ordered],
            "placed": placed, "rendezvous": [ip, port], "ranks": reduced}


def _load_payload(spec: str) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """``module:function`` or ``path/to/file.py:function``."""
    target, _, name = spec.rpartition(":")
    main = sys.modules.get("__main__")
    if target.endswith(".py") and os.path.abspath(target) == os.path.abspath(getattr(main, "__file__", "")):
        module = main  # this very file: its functions pickle by value, so Ray workers need no import
    elif target.endswith(".py"):
        mod_spec = importlib.util.spec_from_file_location("megacov_cluster_payload", target)
        assert mod_spec is not None and mod_spec.loader is not None, target
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = module
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    return getattr(module, name)


def _driver_main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="run a payload on the Ray cluster at $RAY_ADDRESS")
    parser.add_argument("--payload", required=True, help="module:function or file.py:function")
    parser.add_argument("--nodes", type=int, default=2, help="nodes to wait for before running")
    args = parser.parse_args(argv)
    from megacov.workers.cluster import connect_ray, wait_for_nodes

    connect_ray(None)
    nodes = wait_for_nodes(args.nodes, timeout_s=NODE_START_TIMEOUT_S)
    result = _load_payload(args.payload)(nodes)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# the two-node harness
# ----------------------------------------------------------------------------------------------

@dataclass
class Node:
    name: str
    ip: str
    netns: Optional[str]
    proc: Optional[subprocess.Popen] = None
    log_path: str = ""


@dataclass
class TwoNodeCluster:
    mode: str  # "netns" or "loopback"
    head: Node
    worker: Node
    port: int
    workdir: str
    cpus_per_node: int = 1
    gpus_per_node: int = 0
    """Fake GPUs each node declares to Ray (``--num-gpus``); nothing here uses CUDA."""

    @property
    def address(self) -> str:
        return f"{self.head.ip}:{self.port}"

    def prefix(self, node: Node) -> list[str]:
        return ["ip", "netns", "exec", node.netns] if node.netns else []

    def run_driver(self, payload: str, timeout_s: float = 300) -> dict[str, Any]:
        """Run ``payload`` in a driver process on the head node; return its JSON result."""
        env = _node_env(self)
        env["RAY_ADDRESS"] = self.address
        cmd = self.prefix(self.head) + [sys.executable, os.path.abspath(__file__), "--payload", payload]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
        if proc.returncode != 0 or not lines:
            raise AssertionError(f"driver failed (exit {proc.returncode})\n--- stdout\n{proc.stdout[-4000:]}"
                                 f"\n--- stderr\n{proc.stderr[-6000:]}\n--- node logs\n{self.node_logs()}")
        return json.loads(lines[-1][len(RESULT_PREFIX):])

    def node_logs(self) -> str:
        out = []
        for node in (self.head, self.worker):
            with contextlib.suppress(OSError), open(node.log_path) as fh:
                out.append(f"[{node.name}] " + fh.read()[-2000:])
        return "\n".join(out)


def _node_env(cluster: TwoNodeCluster) -> dict[str, str]:
    from megacov.workers.cluster import ray_auth_env

    env = dict(os.environ)
    env.update(RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    env.update(ray_auth_env())  # one authentication mode for head, worker and driver, as launchers do
    env.pop("RAY_ADDRESS", None)
    return env


def _ip_cmd(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _netns_usable() -> tuple[bool, str]:
    if shutil.which("ip") is None:
        return False, "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    probe = f"mcprobe{uuid.uuid4().hex[:6]}"
    try:
        _ip_cmd("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return False, f"`ip netns add` failed: {getattr(exc, 'stderr', exc)!s}".strip()
    with contextlib.suppress(subprocess.CalledProcessError, OSError):
        _ip_cmd("netns", "del", probe)
    return True, ""


def _make_netns_pair(tag: str, subnet: str) -> tuple[str, str, list[str]]:
    """Two namespaces joined by a veth pair; each gets a default route over it so that Ray's
    "which address do I use" probe (a UDP connect, which sends nothing) finds the veth address."""
    ns_a, ns_b = f"mch{tag}", f"mcw{tag}"
    dev_a, dev_b = f"mch{tag}", f"mcw{tag}"
    _ip_cmd("netns", "add", ns_a)
    _ip_cmd("netns", "add", ns_b)
    _ip_cmd("link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)
    for ns, dev, host in ((ns_a, dev_a, 1), (ns_b, dev_b, 2)):
        _ip_cmd("-n", ns, "addr", "add", f"{subnet}.{host}/24", "dev", dev)
        _ip_cmd("-n", ns, "link", "set", "lo", "up")
        _ip_cmd("-n", ns, "link", "set", dev, "up")
        _ip_cmd("-n", ns, "route", "add", "default", "dev", dev)
    return ns_a, ns_b, [ns_a, ns_b]


def _free_loopback_port() -> int:
    from megacov.workers.cluster import free_port

    return free_port("127.0.0.1")


def _start_node(cluster: TwoNodeCluster, node: Node, head: bool) -> None:
    """Start a node through docker/ray-node.sh, the script the compose cluster's containers run."""
    temp_dir = os.path.join(cluster.workdir, node.name)
    node.log_path = os.path.join(cluster.workdir, f"{node.name}.log")
    extra = [f"--node-ip-address={node.ip}", f"--object-store-memory={OBJECT_STORE_BYTES}",
             f"--temp-dir={temp_dir}"]
    if head:
        extra.append("--include-dashboard=false")
    if cluster.gpus_per_node:
        extra.append(f"--num-gpus={cluster.gpus_per_node}")
    if cluster.mode == "loopback":  # the default ports would collide with other local clusters
        extra.append(f"--dashboard-agent-listen-port={_free_loopback_port()}")
        if head:
            extra.append(f"--ray-client-server-port={_free_loopback_port()}")
    env = _node_env(cluster)
    env.update(RAY_PORT=str(cluster.port), RAY_HEAD=cluster.address, RAY_NUM_CPUS=str(cluster.cpus_per_node),
               RAY_START_ARGS=" ".join(extra))
    cmd = cluster.prefix(node) + ["bash", RAY_NODE_SCRIPT, "head" if head else "worker"]
    with open(node.log_path, "w") as log:
        # A session of its own: teardown signals exactly this process group, never `ray stop`
        # (which would kill every Ray process on the machine, other users' included).
        node.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)


def _wait_started(node: Node, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(node.log_path) as fh:
            if "Ray runtime started" in fh.read():
                return
        if node.proc is not None and node.proc.poll() is not None:
            break
        time.sleep(0.5)
    with open(node.log_path) as fh:
        raise AssertionError(f"ray node '{node.name}' did not start:\n{fh.read()[-4000:]}")


def _stop_node(node: Node) -> None:
    """SIGTERM the node's process group (``ray start --block`` then stops its raylet, GCS, workers),
    SIGKILL what is left after a grace period, and reap leftovers that carry this node's temp dir."""
    if node.proc is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.proc.pid, signal.SIGTERM)
    try:  # Ray drains for up to 30 s on SIGTERM; nothing here needs draining
        node.proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.proc.wait(timeout=10)


def _leftover_pids(marker: str) -> list[int]:
    """Processes whose command line names this cluster's private temp dir (so: started by it)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                if marker.encode() in fh.read():
                    pids.append(int(entry))
    return pids


@contextlib.contextmanager
def two_node_cluster(prefer_netns: bool = True, cpus_per_node: int = 1,
                     gpus_per_node: int = 0) -> Iterator[TwoNodeCluster]:
    """Start a head and a worker Ray node; always tear both (and any namespaces) down.

    ``cpus_per_node`` is the logical CPU count each node offers Ray (a training payload that places
    ranks and rollout engines on both nodes needs more than the all-reduce's one)."""
    tag = uuid.uuid4().hex[:6]
    workdir = tempfile.mkdtemp(prefix=f"mc_ray_{tag}_")
    ok, why = _netns_usable() if prefer_netns else (False, "not requested")
    namespaces: list[str] = []
    started: list[Node] = []
    try:
        if ok:
            subnet = f"10.213.{int(tag[:2], 16)}"
            ns_a, ns_b, namespaces = _make_netns_pair(tag, subnet)
            head, worker = Node("head", f"{subnet}.1", ns_a), Node("worker", f"{subnet}.2", ns_b)
            cluster = TwoNodeCluster("netns", head, worker, 6379, workdir, cpus_per_node, gpus_per_node)
        else:
            print(f"network namespaces unavailable ({why}): two Ray nodes on loopback instead")
            head, worker = Node("head", "127.0.0.2", None), Node("worker", "127.0.0.3", None)
            cluster = TwoNodeCluster("loopback", head, worker, _free_loopback_port(), workdir, cpus_per_node,
                                     gpus_per_node)
        print(f"two-node Ray cluster, mode={cluster.mode}: head {head.ip}, worker {worker.ip}")
        for node, is_head in ((head, True), (worker, False)):
            started.append(node)
            _start_node(cluster, node, head=is_head)
            _wait_started(node, NODE_START_TIMEOUT_S)
        yield cluster
    finally:
        for node in reversed(started):
            _stop_node(node)
        for pid in _leftover_pids(workdir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for ns in namespaces:  # deleting a namespace also removes its end of the veth pair
            with contextlib.suppress(subprocess.CalledProcessError, OSError):
                _ip_cmd("netns", "del", ns)
        shutil.rmtree(workdir, ignore_errors=True)


def run_payload_on_two_nodes(payload: str, prefer_netns: bool = True, cpus_per_node: int = 1,
                             gpus_per_node: int = 0, timeout_s: float = 300) -> tuple[str, dict[str, Any]]:
    """Start the cluster, run ``payload`` (``module:function`` / ``file.py:function``), tear down."""
    with two_node_cluster(prefer_netns, cpus_per_node, gpus_per_node) as cluster:
        return cluster.mode, cluster.run_driver(payload, timeout_s=timeout_s)


# ----------------------------------------------------------------------------------------------
# the test
# ----------------------------------------------------------------------------------------------

def _expected_sum(world: int) -> list[float]:
    return [sum(i * (r + 1) + 10.0 ** r for r in range(world)) for i in range(4)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_node_ray_cluster_gloo_allreduce_crosses_nodes():
    pytest.importorskip("ray")
    mode, res = run_payload_on_two_nodes(f"{os.path.abspath(__file__)}:allreduce_payload")
    print(json.dumps(res, indent=1))
    node_ids = [n["node_id"] for n in res["nodes"]]
    assert len(node_ids) == 2 and len(set(node_ids)) == 2, node_ids
    # each actor sits on the node it was pinned to, and the two nodes have different addresses
    assert [p["node_id"] for p in res["placed"]] == node_ids
    ips = [p["ip"] for p in res["placed"]]
    assert ips == [n["ip"] for n in res["nodes"]] and len(set(ips)) == 2, ips
    # the rendezvous is rank 0's own node address, never a name that means "this machine"
    ip, port = res["rendezvous"]
    assert ip == ips[0] and ip != "localhost" and 1024 <= port < 65536
    ranks = sorted(res["ranks"], key=lambda r: r["rank"])
    assert [r["node_id"] for r in ranks] == node_ids
    for r in ranks:
        assert r["world"] == 2
        assert r["sum"] == _expected_sum(2), r
    if mode == "netns":
        # separate network stacks: rank 1 could only have reached rank 0 over the veth link
        assert len({p["net"] for p in res["placed"]}) == 2
        assert not ip.startswith("127.")
        assert all(r["gloo_ifname"] and r["gloo_ifname"] != "lo" for r in ranks), ranks
    else:
        print("NOTE: loopback fallback: two Ray nodes with distinct node ids on one network stack")


if __name__ == "__main__":
    sys.exit(_driver_main())
