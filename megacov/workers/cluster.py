"""Joining a Ray cluster and agreeing on a torch.distributed rendezvous that works across nodes.

Why this module exists: a single-node setup hides three multi-node mistakes that peer systems ship
with — a rendezvous address of ``localhost`` (the other nodes connect to themselves), a free port
picked on the driver's node (it says nothing about the port on rank 0's node), and gloo binding to
whatever the host name resolves to (often a loopback or an address another node cannot reach).
Here rank 0's *own* node reports its routable IP and a port that is free *on that node*, and the
interface that owns that IP is named explicitly for gloo.

Ray is imported inside the functions only, so ``import megacov.workers.cluster`` stays cheap. The
worker group (``megacov.workers.group``) mixes :class:`RendezvousMixin` into its Ray actor class and
calls :func:`rendezvous_address` with its actor handles ordered by rank.

``python -m megacov.workers.cluster wait-nodes --nodes N`` blocks until N nodes have joined and
``... node-ip [--iface IF]`` prints the address a node should give ``ray start``; the launchers in
``tools/launch`` and ``docker/`` use both.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)

RAY_ADDRESS_ENV = "RAY_ADDRESS"


def _available_cpus() -> int:
    """CPUs this process may run on (cgroup/affinity aware), not the host's count that Ray would see."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_address(config_address: Optional[str]) -> Optional[str]:
    """The cluster to join: ``trainer.ray_address`` first, then ``$RAY_ADDRESS``; None means local."""
    for value in (config_address, os.environ.get(RAY_ADDRESS_ENV)):
        if value is not None and value.strip():
            return value.strip()
    return None


def ray_auth_env() -> dict[str, str]:
    """``{"RAY_AUTH_MODE": "token"}`` when a Ray token is available and no mode was chosen, else {}.

    Ray 2.5x's ``ray start --head`` turns token authentication on by itself when it finds a token
    (``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, e.g. left by an earlier
    local ``ray.init()``), but ``ray start --address`` and drivers do not, and are then refused
    ("Authentication token is missing"). Launchers therefore decide once and give every node the
    same mode; with a shared home directory every node also sees the same token.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return {}
    default = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or default
    if os.environ.get("RAY_AUTH_TOKEN") or (os.path.isfile(path) and os.path.getsize(path) > 0):
        return {"RAY_AUTH_MODE": "token"}
    return {}


def _match_cluster_auth_mode() -> None:
    """A joining driver uses token authentication when a token is available (see
    :func:`ray_auth_env`), as the head did; an explicit ``$RAY_AUTH_MODE`` is left alone."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _probe_gcs(address: str, timeout_s: float = 5.0) -> Optional[str]:
    """None if ``host:port`` accepts TCP connections, else the reason it does not.

    ``ray.init`` keeps retrying an address nobody listens on for minutes before failing; a plain
    connect answers in at most ``timeout_s``. Addresses that are not ``host:port`` (``auto``,
    ``ray://...``) are left to Ray.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address or not host:
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def connect_ray(address: Optional[str], num_cpus: Optional[int] = None,
                namespace: str = "megacov") -> None:
    """Join an existing cluster when an address is known, else start a private local one.

    ``address`` is ``trainer.ray_address`` (``auto``, ``host:port`` or ``ray://host:port``); when it
    is None, ``$RAY_ADDRESS`` is used. Without either, a local single-node cluster is started with an
    explicit ``num_cpus`` (default: the CPUs this process may use), because Ray's own detection
    counts the host's CPUs inside containers and then over-subscribes the cgroup.

    Calling it again in a process that is already connected does nothing.
    """
    import ray

    if ray.is_initialized():
        return
    target = resolve_address(address)
    if target is None:
        cpus = num_cpus if num_cpus is not None else _available_cpus()
        # address="local": without it, ray.init() joins any cluster `ray start` left on this machine.
        ray.init(address="local", num_cpus=cpus, namespace=namespace, include_dashboard=False,
                 log_to_driver=True, configure_logging=False)
        log.info("started a local Ray cluster with %d CPU(s)", cpus)
        return
    if num_cpus is not None:
        log.warning("num_cpus=%s ignored: resources of an existing cluster are set by `ray start`", num_cpus)
    source = "trainer.ray_address" if address else f"${RAY_ADDRESS_ENV}"
    unreachable = _probe_gcs(target)
    if unreachable is not None:
        raise RuntimeError(f"cannot join the Ray cluster at '{target}' (from {source}): nothing accepts "
                           f"connections there ({unreachable}). Check that `ray start --head` runs there "
                           f"and that this node can reach its GCS port.")
    _match_cluster_auth_mode()
    try:
        ray.init(address=target, namespace=namespace, log_to_driver=True, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RuntimeError(
            f"cannot join the Ray cluster at '{target}' (from {source}): {exc}. Check that "
            f"`ray start --head` runs there and that this node can reach its GCS port."
        ) from exc
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    log.info("joined Ray cluster %s (from %s): %d node(s) alive", target, source, len(nodes))


def node_ip() -> str:
    """This node's routable IP as Ray knows it (the ``--node-ip-address`` the node was started with).

    Inside a Ray worker or driver this is the address other nodes reach this node at; outside Ray it
    is the source address of the default route.
    """
    import ray.util

    return ray.util.get_node_ip_address()


def host_ip(iface: Optional[str] = None) -> str:
    """This host's IPv4 address for Ray's ``--node-ip-address``, before Ray runs.

    With ``iface`` the address of that interface (for nodes with several networks, e.g. to keep
    Ray's control traffic off a storage network); otherwise the source address of the default
    route, found by connecting a UDP socket, which sends no packet.
    """
    if iface:
        import psutil

        addrs = psutil.net_if_addrs().get(iface)
        if addrs is None:
            raise ValueError(f"no network interface '{iface}' on {socket.gethostname()}")
        for a in addrs:
            if a.family == socket.AF_INET:
                return str(a.address)
        raise ValueError(f"interface '{iface}' on {socket.gethostname()} has no IPv4 address")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: only the routing table is consulted
            return str(sock.getsockname()[0])
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def free_port(host: str = "") -> int:
    """A TCP port that is free on *this* node for every interface (``host=''``) at the time of asking.

    The socket is closed before returning, so another process could take the port in between; the
    rendezvous store binds it within milliseconds, and a collision surfaces as a clear EADDRINUSE.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def interface_for_ip(ip: str) -> Optional[str]:
    """Name of the network interface that carries ``ip`` on this node (None if none does)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    return None


def collective_env(ip: str) -> dict[str, str]:
    """Environment that pins gloo to the interface owning this node's Ray IP.

    Without it gloo resolves the host name, which in containers and multi-homed nodes often yields
    an address the other nodes cannot reach. Variables the user already set are left alone (so are
    NCCL's, whose own interface detection is right on InfiniBand clusters).
    """
    env: dict[str, str] = {}
    ifname = interface_for_ip(ip)
    if ifname and "GLOO_SOCKET_IFNAME" not in os.environ:
        env["GLOO_SOCKET_IFNAME"] = ifname
    return env


def network_stack_id() -> str:
    """Identifies this process's network stack: kernel boot id + network-namespace inode.

    Two processes can reach each other over loopback exactly when these are equal, whatever Ray
    calls their nodes (two Ray nodes may share one host, and two containers on one host may not).
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/net').st_ino}"
    except OSError:  # not Linux: fall back to the host name
        return socket.gethostname()


class RendezvousMixin:
    """Methods a Ray actor class needs so that :func:`rendezvous_address` can use its handles."""

    def node_info(self) -> dict[str, str]:
        """Ray node id, IP and network stack of the node this actor was placed on."""
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": node_ip(),
                "net": network_stack_id()}

    def rendezvous_endpoint(self) -> tuple[str, int]:
        """This node's IP and a port free on it: only rank 0's answer is used."""
        return node_ip(), free_port()


def rendezvous_address(worker_actor_handles: Sequence[Any], timeout_s: float = 120.0) -> tuple[str, int]:
    """``(ip, port)`` for ``init_process_group(init_method=f"tcp://{ip}:{port}")``.

    The handles are ordered by rank; rank 0's actor is asked, on its own node, for its routable IP
    and a port free there. A loopback answer is refused unless every rank shares rank 0's network
    stack, because ranks elsewhere would dial themselves and hang until the store times out.
    """
    import ray

    if not worker_actor_handles:
        raise ValueError("rendezvous_address needs at least one actor handle (rank 0 first)")
    ip, port = ray.get(worker_actor_handles[0].rendezvous_endpoint.remote(), timeout=timeout_s)
    if ip.startswith("127.") or ip in ("localhost", "::1"):
        infos = ray.get([h.node_info.remote() for h in worker_actor_handles], timeout=timeout_s)
        stacks = {info["net"] for info in infos}
        if len(stacks) > 1:
            raise RuntimeError(
                f"rank 0 reports the loopback address {ip} but the ranks run on {len(stacks)} "
                f"different hosts or network namespaces: start each Ray node with "
                f"--node-ip-address=<its routable IP>"
            )
    return ip, int(port)


def alive_nodes() -> list[dict[str, Any]]:
    """Nodes of the connected cluster that are alive, as ``ray.nodes()`` describes them."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def wait_for_nodes(count: int, timeout_s: float = 300.0, poll_s: float = 1.0,
                   gpu_nodes: int = 0) -> list[dict[str, Any]]:
    """Block until at least ``count`` nodes, of which ``gpu_nodes`` offer GPUs, are alive.

    Raises TimeoutError naming how many joined, so a launcher fails with the reason in its log
    instead of a training job that hangs waiting for resources that never come.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = alive_nodes()
        with_gpus = [n for n in nodes if n.get("Resources", {}).get("GPU", 0) > 0]
        if len(nodes) >= count and len(with_gpus) >= gpu_nodes:
            return nodes
        if time.monotonic() >= deadline:
            ips = ", ".join(sorted(n.get("NodeManagerAddress", "?") for n in nodes)) or "none"
            raise TimeoutError(f"{len(nodes)} Ray node(s) ({len(with_gpus)} with GPUs) joined within "
                               f"{timeout_s:.0f} s, waiting for {count} ({gpu_nodes} with GPUs); "
                               f"alive: {ips}")
        time.sleep(poll_s)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megacov.workers.cluster",
                                     description="Ray cluster helpers for the launch scripts")
    sub = parser.add_subparsers(dest="command", required=True)
    wait = sub.add_parser("wait-nodes", help="block until N Ray nodes are alive")
    wait.add_argument("--nodes", type=int, default=1, help="number of nodes to wait for")
    wait.add_argument("--gpu-nodes", type=int, default=0, help="of which this many must offer GPUs")
    wait.add_argument("--address", default=None, help=f"cluster address (default: ${RAY_ADDRESS_ENV})")
    wait.add_argument("--timeout", type=float, default=300.0, help="seconds before giving up")
    ip_cmd = sub.add_parser("node-ip",
                            help="print this host's IPv4 address for `ray start --node-ip-address`")
    ip_cmd.add_argument("--iface", default=None, help="take the address of this interface (e.g. ib0)")
    args = parser.parse_args(argv)
    if args.command == "node-ip":
        try:
            print(host_ip(args.iface or None))
        except ValueError as exc:
            print(f"megacov: error: {exc}", file=sys.stderr)
            return 2
        return 0
    if resolve_address(args.address) is None:
        print(f"megacov: error: no cluster address: pass --address or set ${RAY_ADDRESS_ENV}",
              file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.timeout
    while True:  # the head may still be starting: keep trying to join until the deadline
        try:
            connect_ray(args.address)
            break
        except RuntimeError as exc:
            if time.monotonic() >= deadline:
                print(f"megacov: error: {exc}", file=sys.stderr)
                return 1
            time.sleep(2.0)
    try:
        nodes = wait_for_nodes(args.nodes, max(1.0, deadline - time.monotonic()), gpu_nodes=args.gpu_nodes)
    except TimeoutError as exc:
        print(f"megacov: error: {exc}", file=sys.stderr)
        return 1
    for n in sorted(nodes, key=lambda n: n.get("NodeManagerAddress", "")):
        gpus = n.get("Resources", {}).get("GPU", 0)
        print(f"node {n['NodeID'][:12]} {n.get('NodeManagerAddress', '?')} GPUs={gpus:g}")
    print(f"{len(nodes)} Ray node(s) alive")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
