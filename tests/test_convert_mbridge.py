"""Cross-check with an independent implementation: mbridge (the HF <-> megatron bridge verl uses).

mbridge builds Qwen2 with TransformerEngine's layer spec; on CPU we give it megatron's local spec and
teach its name table the two layer-norm names that differ between the specs (nothing else). Both
bridges then load the same tiny HF checkpoint at TP=2: every megatron shard must be identical, and so
must every HF tensor both export. Skipped when mbridge is not installed.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from megacov.parallel.spawn import run_distributed

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("mbridge") is None, reason="mbridge not installed"),
              pytest.mark.slow]


def _worker(rank: int, world: int, hf_dir: str, tp: int) -> dict:
    from mbridge import AutoBridge

    from megacov.models import build_model, iter_hf_weights
    from megacov.models.core import layer_spec
    from megacov.parallel.layout import ParallelLayout

    layout = ParallelLayout.initialize(tp, 1, seed=1)
    bridge = AutoBridge.from_pretrained(hf_dir, dtype=torch.float32, make_vocab_size_divisible_by=128)
    bridge._get_transformer_layer_spec = lambda vp_stage=None: layer_spec("RMSNorm", False, use_te=False)
    bridge.config.sequence_parallel = False
    bridge.hf_config.rope_theta = bridge.hf_config.rope_parameters["rope_theta"]  # transformers 5 moved it
    # The local spec keeps the layer norms as modules of their own instead of fusing them into TE linears.
    bridge._OTHER_MAPPING = {"input_layernorm.weight": ["model.layers.{layer_number}.input_layernorm.weight"]}
    bridge._MLP_MAPPING = dict(bridge._MLP_MAPPING, **{
        "pre_mlp_layernorm.weight": ["model.layers.{layer_number}.post_attention_layernorm.weight"]})
    theirs_model = bridge.get_model(weight_path=hf_dir, bf16=False, use_cpu_initialization=True)
    ours_model, info = build_model(hf_dir, layout, dtype="fp32")
    bare = theirs_model[0]
    while hasattr(bare, "module"):
        bare = bare.module
    theirs = {k: v.detach().clone() for k, v in bare.named_parameters()}
    ours = {k: v.detach().clone() for k, v in ours_model.named_parameters()}
    their_export = {k: v.clone() for k, v in bridge.export_weights(theirs_model)}
    our_export = {k: v.clone() for k, v in iter_hf_weights(ours_model, layout, info)}
    layout.destroy()
    return {"theirs": theirs, "ours": ours, "their_export": their_export, "our_export": our_export,
            "tp_rank": layout.tp_rank}


def test_same_shards_and_same_export_as_mbridge(tmp_path) -> None:
    from megacov.tiny import build_model

    hf_dir = build_model(str(tmp_path / "qwen2"), architecture="qwen2", num_layers=2, hidden_size=128,
                         num_heads=4, num_kv_heads=2, vocab_size=67)
    results = run_distributed(_worker, 2, hf_dir, 2, timeout_s=600)
    for res in results:
        assert set(res["ours"]) == set(res["theirs"])
        for name, tensor in res["ours"].items():
            assert torch.equal(tensor, res["theirs"][name]), f"tp rank {res['tp_rank']}: {name}"
    root = next(r for r in results if r["tp_rank"] == 0)
    assert set(root["our_export"]) == set(root["their_export"]) and len(root["our_export"]) == 2 * 12 + 3
    for name, tensor in root["our_export"].items():
        assert torch.equal(tensor, root["their_export"][name]), name
