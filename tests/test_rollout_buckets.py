"""Pure parts of the rollout side: fused-group bucketing, the wire format, the mismatch metric, peak RSS."""
from __future__ import annotations

import itertools
import math
import mmap
import random

import pytest
import torch

from megacov.rollout.buckets import FusionMap, PackStats, SyncError, from_wire, pack_buckets, to_wire
from megacov.rollout.memory import PeakRss
from megacov.rollout.mismatch import logprob_mismatch, mismatch_sample, pad_logprobs

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _engine_params(layers: int) -> list[str]:
    names = ["model.embed_tokens.weight"]
    for i in range(layers):
        p = f"model.layers.{i}"
        names += [f"{p}.self_attn.qkv_proj.weight", f"{p}.self_attn.qkv_proj.bias", f"{p}.self_attn.o_proj.weight",
                  f"{p}.mlp.gate_up_proj.weight", f"{p}.mlp.down_proj.weight", f"{p}.input_layernorm.weight"]
    return names + ["model.norm.weight", "lm_head.weight"]


def _hf_stream(layers: int, hidden: int = 8, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """HF tensors in megatron export order (fused parts consecutive), random sizes per family."""
    g = torch.Generator().manual_seed(seed)
    out = [("model.embed_tokens.weight", torch.randn(13, hidden, generator=g))]
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", torch.randn(hidden, generator=g))]
        out += [(f"{p}.self_attn.{x}_proj.weight", torch.randn(hidden, hidden, generator=g)) for x in "qkv"]
        out += [(f"{p}.self_attn.{x}_proj.bias", torch.randn(hidden, generator=g)) for x in "qkv"]
        out += [(f"{p}.self_attn.o_proj.weight", torch.randn(hidden, hidden, generator=g))]
        out += [(f"{p}.mlp.{x}_proj.weight", torch.randn(2 * hidden, hidden, generator=g)) for x in ("gate", "up")]
        out += [(f"{p}.mlp.down_proj.weight", torch.randn(hidden, 2 * hidden, generator=g))]
    return out + [("model.norm.weight", torch.randn(hidden, generator=g)),
                  ("lm_head.weight", torch.randn(13, hidden, generator=g))]


def test_engine_fusion_map_names_every_expert_of_a_moe_layer_from_vllms_mapping():
    """The w13 / w2 groups of a vLLM MoE layer hold every expert's HF names, from vLLM's own mapping."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    from megacov.rollout.engine_model import engine_fusion_map

    class Experts(torch.nn.Module):  # the attributes of vLLM's RoutedExperts that the map reads
        layer_name = "model.layers.0.mlp.experts"

        def __init__(self) -> None:
            super().__init__()
            self.w13_weight = torch.nn.Parameter(torch.zeros(4, 6, 8))
            self.w2_weight = torch.nn.Parameter(torch.zeros(4, 8, 3))

        def get_expert_mapping(self):
            return RoutedExperts.build_expert_params_mapping("gate_proj", "down_proj", "up_proj", num_experts=4,
                                                             routed_experts_prefix="")

    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.model.layers[0].mlp = torch.nn.Module()
    model.model.layers[0].mlp.experts = torch.nn.Module()
    model.model.layers[0].mlp.experts.routed_experts = Experts()
    model.model.layers[0].mlp.gate = torch.nn.Linear(8, 4, bias=False)
    groups = engine_fusion_map(model).to_dict()
    base = "model.layers.0.mlp.experts"
    assert sorted(groups[f"{base}.routed_experts.w13_weight"]) == sorted(
        f"{base}.{e}.{p}_proj.weight" for e in range(4) for p in ("gate", "up"))
    assert sorted(groups[f"{base}.routed_experts.w2_weight"]) == [f"{base}.{e}.down_proj.weight" for e in range(4)]
    assert groups["model.layers.0.mlp.gate"] == ["model.layers.0.mlp.gate.weight"]


def test_fusion_map_expands_packed_modules_into_hf_names():
    fusion = FusionMap.from_engine_params(_engine_params(2), PACKED)
    assert fusion.members["model.layers.1.self_attn.qkv_proj"] == (
        "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
        "model.layers.1.self_attn.v_proj.weight", "model.layers.1.self_attn.q_proj.bias",
        "model.layers.1.self_attn.k_proj.bias", "model.layers.1.self_attn.v_proj.bias")
    assert fusion.key("model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.gate_up_proj"
    assert fusion.group_size("model.layers.0.mlp.gate_up_proj") == 2
    assert fusion.key("model.norm.weight") == "model.norm"
    assert fusion.expected == {n for n, _ in _hf_stream(2)}


@pytest.mark.parametrize("capacity", [1, 100, 700, 1500, 4000, 10 ** 9])
def test_buckets_respect_capacity_and_never_split_a_fused_module(capacity):
    stream = _hf_stream(3)
    fusion = FusionMap.from_engine_params(_engine_params(3), PACKED)
    stats = PackStats()
    buckets = list(pack_buckets(iter(stream), capacity, fusion, stats))
    # every tensor exactly once, in order, and unchanged
    flat = [item for b in buckets for item in b]
    assert [n for n, _ in flat] == [n for n, _ in stream]
    assert all(a is b for (_, a), (_, b) in zip(flat, stream))
    sizes = [sum(t.numel() * t.element_size() for _, t in b) for b in buckets]
    for bucket, size in zip(buckets, sizes):
        keys = {fusion.key(n) for n, _ in bucket}
        for key in keys:  # a group is wholly inside one bucket
            assert sum(fusion.key(n) == key for n, _ in bucket) == fusion.group_size(key)
        if size > capacity:
            assert len(keys) == 1, "only a single group may exceed the capacity"
    largest = max(sum(t.numel() * t.element_size() for n, t in stream if fusion.key(n) == k) for k in fusion.members)
    assert stats.largest_group_bytes == largest
    assert stats.peak_held_bytes <= capacity + largest
    assert stats.buckets == len(buckets) and stats.bytes == sum(sizes)
    if capacity >= sum(sizes):
        assert len(buckets) == 1
    # greedy packing: no two neighbouring buckets could have been merged
    for a, b in itertools.pairwise(sizes):
        assert a + b > capacity or a >= capacity


def test_incomplete_or_repeated_groups_are_refused():
    fusion = FusionMap.from_engine_params(_engine_params(1), PACKED)
    stream = [(n, t) for n, t in _hf_stream(1) if n != "model.layers.0.self_attn.v_proj.weight"]
    with pytest.raises(SyncError, match="incomplete fused module.*qkv_proj"):
        list(pack_buckets(iter(stream), 10 ** 6, fusion))
    stream = _hf_stream(1) + [("model.norm.weight", torch.zeros(8))]
    with pytest.raises(SyncError, match="exported twice"):
        list(pack_buckets(iter(stream), 10 ** 6, fusion))
    with pytest.raises(SyncError, match="positive"):
        list(pack_buckets(iter(stream), 0, fusion))
    with pytest.raises(SyncError, match="two engine modules"):
        FusionMap({"a": ["x", "y"], "b": ["y"]})


def test_wire_round_trip_keeps_bytes_dtypes_and_shapes():
    base = torch.randn(6, 5, dtype=torch.float64)
    tensors = [("a", torch.randn(3, 4)), ("b", torch.randn(7).to(torch.bfloat16)), ("c", torch.empty(0, 3)),
               ("d", base[:, 1:3]), ("e", torch.arange(5, dtype=torch.int64)), ("f", torch.tensor(2.5))]
    metas, buffers = to_wire(tensors)
    for wrap in (lambda b: b, lambda b: bytes(memoryview(b)), lambda b: torch.from_numpy(b.copy())):
        back = from_wire(metas, [wrap(b) for b in buffers])
        for (n0, t0), (n1, t1) in zip(tensors, back):
            assert n0 == n1 and t0.dtype == t1.dtype and t0.shape == t1.shape
            assert torch.equal(t0, t1)
    with pytest.raises(SyncError, match="expected"):
        from_wire(metas[:1], [buffers[0][:-4]])
    with pytest.raises(SyncError, match="descriptions"):
        from_wire(metas, buffers[:-1])


def test_mismatch_matches_a_float64_reference_loop():
    rng = random.Random(0)
    rows, cols = 5, 9
    actor = [[rng.uniform(-6, 0) for _ in range(cols)] for _ in range(rows)]
    rollout = [[a + rng.gauss(0, 0.3) for a in row] for row in actor]
    mask = [[1 if rng.random() < 0.7 else 0 for _ in range(cols)] for _ in range(rows)]
    deltas = [actor[i][j] - rollout[i][j] for i in range(rows) for j in range(cols) if mask[i][j]]
    got = logprob_mismatch(torch.tensor(actor, dtype=torch.float32).double(), torch.tensor(rollout),
                           torch.tensor(mask))
    t_actor = torch.tensor(actor, dtype=torch.float32).double().tolist()
    t_roll = torch.tensor(rollout).double().tolist()  # float32 storage, as the function sees it
    deltas = [t_actor[i][j] - t_roll[i][j] for i in range(rows) for j in range(cols) if mask[i][j]]
    assert got["mismatch/tokens"] == len(deltas)
    assert got["mismatch/abs_max"] == pytest.approx(max(abs(d) for d in deltas), abs=1e-12)
    assert got["mismatch/abs_mean"] == pytest.approx(sum(abs(d) for d in deltas) / len(deltas), abs=1e-12)
    assert got["mismatch/mean"] == pytest.approx(sum(deltas) / len(deltas), abs=1e-12)
    k3 = sum(math.exp(-d) - 1 + d for d in deltas) / len(deltas)
    assert got["mismatch/k3"] == pytest.approx(k3, abs=1e-12) and got["mismatch/k3"] >= 0
    assert got["mismatch/ratio_max"] == pytest.approx(max(math.exp(d) for d in deltas), rel=1e-12)
    empty = logprob_mismatch(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3))
    assert empty["mismatch/tokens"] == 0 and empty["mismatch/abs_max"] == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        logprob_mismatch(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3))


def test_mismatch_sample_and_padding():
    a = mismatch_sample(50, 8, step=3, seed=1)
    assert a == mismatch_sample(50, 8, step=3, seed=1) and len(set(a)) == 8 and a == sorted(a)
    assert a != mismatch_sample(50, 8, step=4, seed=1)
    assert mismatch_sample(5, 8, step=0) == [0, 1, 2, 3, 4] and mismatch_sample(5, 0, step=0) == []
    values, mask = pad_logprobs([[-1.0, -2.0], [], [-0.5]], 3)
    assert values.tolist() == [[-1.0, -2.0, 0.0], [0.0, 0.0, 0.0], [-0.5, 0.0, 0.0]]
    assert mask.sum().item() == 3
    with pytest.raises(ValueError, match="more than width"):
        pad_logprobs([[0.0] * 4], 3)


def test_peak_rss_sees_a_transient_allocation():
    with PeakRss() as peak:
        # 64 MiB of fresh pages, touched (an anonymous map: a heap allocation could reuse pages that
        # earlier tests left resident, and then RSS would not grow)
        block = mmap.mmap(-1, 64 * 2 ** 20)
        block.write(b"\x01" * (64 * 2 ** 20))
        block.close()
    if peak.extra_bytes is None:
        pytest.skip("this kernel does not allow resetting the peak RSS")
    assert 60 * 2 ** 20 <= peak.extra_bytes <= 200 * 2 ** 20
    with PeakRss() as quiet:
        pass
    assert quiet.extra_bytes is not None and quiet.extra_bytes < 16 * 2 ** 20
