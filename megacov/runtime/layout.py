"""Planning without starting anything: GPU or CPU, the shared bundle layout, the reference decision.

* **GPU or CPU** comes from the cluster's declared resources (``ray.cluster_resources()``) and the
  config (``parallel.num_gpus=0`` forces CPU), never from this process's ``torch.cuda``: under
  KubeRay the driver runs on a CPU-only head pod while the workers have GPUs.
* **Colocated bundles**: one placement group of ``world`` bundles, each ``{GPU: 1, CPU:
  trainer.cpus_per_worker + rollout.cpus_per_engine}``. Rank ``r`` books its CPUs and a GPU fraction
  of bundle ``r``; engine ``e``'s worker ``k`` books its CPUs and a fraction of bundle ``e * tp + k``.
  Both tenants fit by construction, so neither waits for the other's CPU. Engines must fit into the
  ranks' bundles: ``rollout.engines * rollout.tp <= world`` (checked at ``--dry-run``).
* **Reference policy**: built only when a KL term reads it (``algorithm.kl_coef > 0``, in the loss or
  in the reward); otherwise nothing is built, loaded or run for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ClusterView:
    """What the cluster declares (all nodes), read once after connecting."""

    cpus: float
    gpus: float
    nodes: int = 1

    @classmethod
    def from_ray(cls) -> ClusterView:
        import ray

        total = ray.cluster_resources()
        alive = [n for n in ray.nodes() if n.get("Alive")]
        return cls(cpus=float(total.get("CPU", 0)), gpus=float(total.get("GPU", 0)), nodes=max(1, len(alive)))


def decide_gpu(cfg: Any, cluster: ClusterView) -> bool:
    """GPU path when the cluster declares GPUs, unless ``parallel.num_gpus=0`` asks for CPU."""
    if cfg.parallel.num_gpus == 0:
        return False
    return cluster.gpus > 0


def needs_reference(cfg: Any) -> bool:
    """A KL term reads the reference: ``algorithm.kl_coef > 0`` (loss or ``use_kl_in_reward``)."""
    return float(cfg.algorithm.kl_coef) > 0


def reference_note(cfg: Any) -> str:
    if needs_reference(cfg):
        where = "the reward" if cfg.algorithm.use_kl_in_reward else "the loss"
        return f"reference policy: built (algorithm.kl_coef={cfg.algorithm.kl_coef:g} in {where})"
    return "reference policy: skipped (algorithm.kl_coef=0: no KL term reads it; actor/kl_ref is not logged)"


def check_async_placement(cfg: Any) -> None:
    """An async rollout overlaps generation with training: colocated engines sleep while the actor
    trains, so the two cannot overlap there (one line, keys named)."""
    from megacov.config import ConfigError

    if cfg.trainer.async_rollout and cfg.rollout.placement == "colocated":
        raise ConfigError("trainer.async_rollout=true cannot overlap generation with training under "
                          "rollout.placement=colocated (the engines share the ranks' devices and sleep while "
                          "the actor trains); set rollout.placement=disaggregated or trainer.async_rollout=false")


def rollout_schedule(cfg: Any) -> str:
    if cfg.trainer.async_rollout:
        return ("rollout: async, one step off-policy (engines generate step t+1 with the policy of step t-1 "
                "while the actor trains on step t; weight sync at the step boundary)")
    return "rollout: synchronous (engines generate, then the actor trains)"


def check_colocation(cfg: Any, world: int) -> None:
    """Colocated engines live in the training ranks' bundles: they must fit (one line, keys named)."""
    from megacov.config import ConfigError

    check_async_placement(cfg)
    ro = cfg.rollout
    if ro.placement == "colocated" and ro.engines * ro.tp > world:
        raise ConfigError(
            f"rollout.engines*rollout.tp={ro.engines}*{ro.tp}={ro.engines * ro.tp} exceeds the {world} training "
            f"ranks (parallel.tp*pp*dp) whose bundles colocated engines share; lower rollout.engines or "
            f"rollout.tp, raise parallel.dp, or set rollout.placement=disaggregated")


@dataclass(frozen=True)
class BundleLayout:
    """Where ranks and engines go; ``shared`` = one placement for both (colocated on GPU)."""

    shared: bool
    bundles: int
    bundle: dict[str, float]
    rank_cpus: float
    rank_gpus: float

    @classmethod
    def plan(cls, cfg: Any, world: int, use_gpu: bool) -> BundleLayout:
        from megacov.workers.group import GPU_FRACTION_COLOCATED

        t, ro = cfg.trainer, cfg.rollout
        check_async_placement(cfg)
        if use_gpu and ro.placement == "colocated":
            check_colocation(cfg, world)
            return cls(True, world, {"CPU": float(t.cpus_per_worker + ro.cpus_per_engine), "GPU": 1.0},
                       t.cpus_per_worker, GPU_FRACTION_COLOCATED)
        bundle = {"CPU": float(t.cpus_per_worker)}
        if use_gpu:
            bundle["GPU"] = 1.0
        return cls(False, world, bundle, t.cpus_per_worker, 1.0 if use_gpu else 0.0)

    def describe(self) -> str:
        what = "shared by ranks and engines" if self.shared else "actor ranks (engines have their own)"
        return f"{self.bundles} bundle(s) of {self.bundle}, {what}"


def plan_table(cfg: Any, world: int, use_gpu: bool, gpus_source: str) -> str:
    """Device decision, bundles, per-engine weight transfer and the reference decision, as lines."""
    from megacov.rollout.plan import route_engines, routes_table

    layout = BundleLayout.plan(cfg, world, use_gpu)
    ro = cfg.rollout
    # Before start, placement is known by plan: colocated engines sit on their ranks' nodes.
    exporters = ["node0"]
    engines = ["node0" if layout.shared else f"engine-node{e}" for e in range(ro.engines)]
    routes = route_engines(ro.sync_transport, use_gpu=use_gpu, exporter_nodes=exporters, engine_nodes=engines,
                           m2n=False if not use_gpu else None, pp=cfg.parallel.pp)
    lines = [f"devices: {'GPU' if use_gpu else 'CPU'} ({gpus_source})", f"bundles: {layout.describe()}",
             reference_note(cfg), rollout_schedule(cfg), "weight sync per engine:", routes_table(routes)]
    return "\n".join(lines)
