"""megacov.workers.cluster on one node: address resolution, ports, interfaces, network stacks, the
launcher subcommands, and a real local Ray cluster for connect / wait / rendezvous."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import uuid

import pytest

from megacov.workers import cluster

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    return env


def test_import_is_cheap():
    code = ("import sys, megacov.workers.cluster; "
            "print(sorted(m for m in ('ray', 'torch', 'vllm', 'megatron') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code],
                         capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_resolve_address_prefers_config_then_env(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster.resolve_address(None) is None
    assert cluster.resolve_address("  ") is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert cluster.resolve_address(None) == "10.0.0.5:6379"
    assert cluster.resolve_address("head:6380") == "head:6380"


def test_free_port_is_bindable_on_all_interfaces():
    port = cluster.free_port()
    with socket.socket() as sock:
        sock.bind(("", port))  # raises if the port were taken
    assert 1024 <= port < 65536


def test_interface_and_collective_env_for_loopback(monkeypatch):
    assert cluster.interface_for_ip("127.0.0.1") == "lo"
    assert cluster.interface_for_ip("203.0.113.77") is None
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    assert cluster.collective_env("127.0.0.1") == {"GLOO_SOCKET_IFNAME": "lo"}
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")  # the user's choice wins
    assert cluster.collective_env("127.0.0.1") == {}


def test_node_ip_subcommand():
    run = [sys.executable, "-m", "megacov.workers.cluster", "node-ip"]
    out = subprocess.run(run + ["--iface", "lo"], capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "127.0.0.1", out.stderr
    default = subprocess.run(run, capture_output=True, text=True, env=_env(), timeout=60)
    assert default.returncode == 0
    socket.inet_aton(default.stdout.strip())  # a dotted IPv4 address
    missing = subprocess.run(run + ["--iface", "nosuchif0"], capture_output=True, text=True, env=_env(),
                             timeout=60)
    assert missing.returncode == 2 and "no network interface 'nosuchif0'" in missing.stderr


def test_wait_nodes_without_address_is_a_usage_error():
    out = subprocess.run([sys.executable, "-m", "megacov.workers.cluster", "wait-nodes", "--nodes", "2"],
                         capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode == 2 and "no cluster address" in out.stderr


def test_wait_nodes_fails_fast_when_nothing_listens():
    port = cluster.free_port("127.0.0.1")  # free, so nothing listens there
    env = dict(_env(), RAY_ADDRESS=f"127.0.0.1:{port}")
    out = subprocess.run([sys.executable, "-m", "megacov.workers.cluster", "wait-nodes", "--timeout", "3"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1
    assert f"cannot join the Ray cluster at '127.0.0.1:{port}' (from $RAY_ADDRESS)" in out.stderr
    assert "nothing accepts connections there" in out.stderr


def test_network_stack_id_distinguishes_namespaces():
    here = cluster.network_stack_id()
    assert here == cluster.network_stack_id()
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("network namespaces need root and iproute2")
    ns = f"mcid{uuid.uuid4().hex[:6]}"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode != 0:
        pytest.skip("`ip netns add` is not permitted here")
    try:
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                              "from megacov.workers.cluster import network_stack_id; "
                              "print(network_stack_id())"],
                             capture_output=True, text=True, env=_env(), timeout=60)
        assert out.returncode == 0, out.stderr
        other = out.stdout.strip()
        assert other != here and other.split(":")[0] == here.split(":")[0]  # same kernel, other stack
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


LOCAL_RAY_SCRIPT = textwrap.dedent("""
    import json, ray
    from megacov.workers.cluster import (RendezvousMixin, connect_ray, free_port, rendezvous_address,
                                         wait_for_nodes)

    connect_ray(None, num_cpus=2)
    connect_ray(None, num_cpus=7)  # already connected: no-op
    res = ray.cluster_resources()

    @ray.remote(num_cpus=1)
    class A(RendezvousMixin):
        pass

    actors = [A.remote(), A.remote()]
    infos = ray.get([a.node_info.remote() for a in actors])
    ip, port = rendezvous_address(actors)
    try:
        wait_for_nodes(2, timeout_s=1.0, poll_s=0.2)
        timeout_msg = None
    except TimeoutError as exc:
        timeout_msg = str(exc)
    print("RESULT " + json.dumps({"cpus": res.get("CPU"), "infos": infos, "ip": ip, "port": port,
                                  "nodes": len(wait_for_nodes(1, 5.0)), "timeout_msg": timeout_msg}))
    ray.shutdown()
""")


def test_local_ray_connect_wait_and_rendezvous():
    pytest.importorskip("ray")
    out = subprocess.run([sys.executable, "-c", LOCAL_RAY_SCRIPT], capture_output=True, text=True,
                         env=_env(), timeout=300, cwd=REPO)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-5000:]
    import json

    res = json.loads(lines[-1][len("RESULT "):])
    assert res["cpus"] == 2.0  # the explicit num_cpus, not the host's count
    assert res["nodes"] == 1
    assert len({i["node_id"] for i in res["infos"]}) == 1
    assert res["ip"] == res["infos"][0]["ip"] and 1024 <= res["port"] < 65536
    msg = res["timeout_msg"]
    assert msg and "1 Ray node(s)" in msg and "waiting for 2" in msg
