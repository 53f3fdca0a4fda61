"""Which vLLM weight-transfer backend feeds each engine, and why: printed in the plan and dry run.

Chosen per engine by locality, like a verl or NeMo-RL refit:

========================  ==============================================================
situation                 backend
========================  ==============================================================
no GPU in the cluster     ``megacov_gloo`` (:mod:`megacov.rollout.transfer`): gloo broadcast
                          from each stage's exporting rank, CPU tensors
GPU, pipeline > 1         ``megacov_gloo``: one sender per stage (vLLM's ipc/nccl have one);
                          tensors staged through host memory
GPU, engine on the        ``ipc``: CUDA IPC handles of the exporter's buffers, no copy over
exporter's node           the network (colocated placement puts engines there)
GPU, engine elsewhere     ``nccl``: broadcast from the exporting rank over the network
========================  ==============================================================

``rollout.sync_transport`` other than ``auto`` forces one backend for every engine (a GPU backend
on a CPU cluster is refused with the key named). vLLM's ``nccl_m2n`` (shard-to-shard, no gather) is
detected (:func:`m2n_available`, shown in the plan) but not yet fed by the Megatron source.
"""
from __future__ import annotations

from dataclasses import dataclass

GPU_BACKENDS = ("ipc", "nccl")
CPU_BACKEND = "megacov_gloo"


@dataclass(frozen=True)
class EngineRoute:
    engine: int
    node: str
    """Where the engine's first worker sits (a node id, or ``node<k>`` in a plan before start)."""
    backend: str
    reason: str


def m2n_available() -> bool:
    """``nccl.m2n`` importable (the runtime vLLM's ``nccl_m2n`` backend needs)."""
    import importlib.util

    return importlib.util.find_spec("nccl") is not None and importlib.util.find_spec("nccl.m2n") is not None


def choose_backend(requested: str, *, use_gpu: bool, same_node: bool, m2n: bool, pp: int = 1) -> tuple[str, str]:
    """``(backend, reason)`` for one engine."""
    from megacov.config import ConfigError

    if requested in ("gloo", CPU_BACKEND):
        return CPU_BACKEND, "forced by rollout.sync_transport"
    if requested != "auto":
        if requested not in GPU_BACKENDS:
            raise ConfigError(f"rollout.sync_transport='{requested}' must be one of auto, gloo, "
                              f"{', '.join(GPU_BACKENDS)}")
        if not use_gpu:
            raise ConfigError(f"rollout.sync_transport='{requested}' needs GPUs but the cluster declares none; "
                              f"use auto or gloo")
        return requested, "forced by rollout.sync_transport"
    if not use_gpu:
        return CPU_BACKEND, "no GPU in the cluster"
    note = " (nccl.m2n present, not yet used)" if m2n else ""
    if pp > 1:
        return CPU_BACKEND, f"parallel.pp={pp}: one sender per stage (vLLM's ipc/nccl have one){note}"
    if same_node:
        return "ipc", f"engine on the exporting rank's node{note}"
    return "nccl", f"engine on another node than the exporting rank{note}"


def route_engines(requested: str, *, use_gpu: bool, exporter_nodes: list[str], engine_nodes: list[str],
                  m2n: bool | None = None, pp: int = 1) -> list[EngineRoute]:
    """One route per engine; ``same_node`` means every stage's exporter shares the engine's node."""
    m2n = m2n_available() if m2n is None and use_gpu else bool(m2n)
    routes = []
    for index, node in enumerate(engine_nodes):
        same = bool(exporter_nodes) and all(n == node for n in exporter_nodes)
        backend, reason = choose_backend(requested, use_gpu=use_gpu, same_node=same, m2n=m2n, pp=pp)
        routes.append(EngineRoute(index, node, backend, reason))
    return routes


def routes_table(routes: list[EngineRoute]) -> str:
    rows = [("engine", "node", "weight transfer", "why")] + [
        (str(r.engine), r.node, r.backend, r.reason) for r in routes]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
