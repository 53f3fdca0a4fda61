"""Qwen3-MoE: config and weight mapping, HF -> megatron at TP x PP x EP, conversion round trip.

The HF models are built with transformers' own ``Qwen3MoeConfig`` (8 experts, top-2, vocabulary 67):
one with a dense layer among the expert layers and renormalised top-k weights, one with
``decoder_sparse_step=2`` and unnormalised weights (the other megatron router mode). Megatron's
logits must equal transformers' within 1e-4 (fp32) at every layout, the export must give back the
HF tensors bit for bit, and hf-to-mcore (saved with EP=2) -> mcore-to-hf must be bit-exact and
load in transformers with the same config.
"""
from __future__ import annotations

import json

import pytest
import torch

from megacov.models import UnsupportedModelError, arch_from_hf, families
from megacov.models.arch import check_layout, hf_tensor_shapes, moe_config
from megacov.models.mapping import MappingError, resolve
from megacov.parallel.spawn import run_distributed

TOL = 1e-4
MODELS = {
    "mixed_norm": dict(num_layers=4, num_kv_heads=2, mlp_only_layers=(1,), norm_topk_prob=True),
    "step2_unnorm": dict(num_layers=4, num_kv_heads=2, mlp_only_layers=(), decoder_sparse_step=2,
                         norm_topk_prob=False, tie_word_embeddings=True),
}


def _hf(**over: object) -> dict:
    cfg = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 64,
           "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "num_hidden_layers": 4,
           "intermediate_size": 96, "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
           "vocab_size": 67, "rms_norm_eps": 1e-6, "max_position_embeddings": 256, "hidden_act": "silu"}
    cfg.update(over)
    return cfg


def test_config_mapping_reads_the_expert_layout() -> None:
    arch = arch_from_hf(_hf(mlp_only_layers=[1], norm_topk_prob=True), vocab_divisible_by=128)
    assert arch.family == "qwen3_moe" and arch.qk_norm
    assert (arch.moe.num_experts, arch.moe.top_k, arch.moe.ffn_hidden_size) == (8, 2, 32)
    assert arch.moe.layers == (True, False, True, True)
    # HF's rule: sparse iff not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
    assert arch_from_hf(_hf(decoder_sparse_step=2), vocab_divisible_by=128).moe.layers == (False, True, False, True)
    # transformers 5 saves num_experts as num_local_experts
    saved = _hf(num_local_experts=4)
    del saved["num_experts"]
    assert arch_from_hf(saved, vocab_divisible_by=128).moe.num_experts == 4
    cfg = moe_config(arch, ep=2)
    assert cfg["moe_layer_freq"] == [1, 0, 1, 1] and cfg["moe_router_pre_softmax"] is False
    assert cfg["expert_model_parallel_size"] == 2 and cfg["moe_router_topk"] == 2
    assert moe_config(arch_from_hf(_hf(), vocab_divisible_by=128), 1)["moe_router_pre_softmax"] is True


@pytest.mark.parametrize("over, key", [
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"mlp_only_layers": [7]}, "mlp_only_layers"),
    ({"shared_expert_intermediate_size": 64}, "shared_expert_intermediate_size"),
    ({"moe_intermediate_size": None}, "moe_intermediate_size"),
])
def test_unsupported_expert_configs_are_named(over: dict, key: str) -> None:
    with pytest.raises(UnsupportedModelError, match=key):
        arch_from_hf(_hf(**over), vocab_divisible_by=128)


def test_layouts_are_checked_against_the_experts() -> None:
    arch = arch_from_hf(_hf(), vocab_divisible_by=128)
    check_layout(arch, 1, 2, 8)
    with pytest.raises(UnsupportedModelError, match="does not divide num_experts=8"):
        check_layout(arch, 1, 1, 3)
    with pytest.raises(UnsupportedModelError, match="moe_intermediate_size=30"):
        check_layout(arch_from_hf(_hf(moe_intermediate_size=30), vocab_divisible_by=128), 4, 1)
    dense = arch_from_hf({**_hf(), "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"},
                         vocab_divisible_by=128)
    with pytest.raises(UnsupportedModelError, match="needs a mixture-of-experts model"):
        check_layout(dense, 1, 1, 2)


def test_expert_names_resolve_to_their_hf_tensors() -> None:
    arch = arch_from_hf(_hf(mlp_only_layers=[1]), vocab_divisible_by=128)
    rules, dims = families()["qwen3_moe"].layer_rules, arch.dims
    res = resolve("decoder.layers.2.mlp.experts.local_experts.5.linear_fc1.weight", rules, dims)
    assert res.hf == ("model.layers.2.mlp.experts.5.gate_proj.weight", "model.layers.2.mlp.experts.5.up_proj.weight")
    assert resolve("decoder.layers.0.mlp.router.weight", rules, dims).hf == ("model.layers.0.mlp.gate.weight",)
    with pytest.raises(MappingError):
        resolve("decoder.layers.0.mlp.experts.shared.weight", rules, dims)
    shapes = hf_tensor_shapes(arch, rules)
    assert "model.layers.1.mlp.gate_proj.weight" in shapes and "model.layers.1.mlp.gate.weight" not in shapes
    assert shapes["model.layers.3.mlp.experts.7.down_proj.weight"] == (64, 32)
    assert not any(k.startswith("model.layers.0.mlp.gate_proj") for k in shapes)


def test_export_refuses_a_layer_with_a_missing_expert() -> None:
    from megacov.models.export import _ExpertLayer

    class _Info:
        arch = arch_from_hf(_hf(), vocab_divisible_by=128)

    layer = _ExpertLayer(3, _Info())
    for e in range(8):
        if e != 6:
            for r in range(2):
                layer.add(e, r, [(f"x.{e}.{r}", torch.zeros(1))])
    with pytest.raises(MappingError, match=r"layer 3: experts \[6\] are missing"):
        list(layer.flush(2))


# ------------------------------------------------------------------------------------------------
# Spawned: every layout of one world size in one job.
# ------------------------------------------------------------------------------------------------


def _worker(rank: int, world: int, layouts: list, dirs: dict, tokens: torch.Tensor) -> dict:
    from megatron.core import parallel_state

    from megacov.models import build_model, iter_hf_weights
    from megacov.models.forward import forward_logits
    from megacov.parallel.layout import ParallelLayout

    out: dict = {}
    layout = None
    for tp, pp, ep in layouts:
        if layout is not None:
            parallel_state.destroy_model_parallel()
        layout = ParallelLayout.initialize(tp, pp, ep=ep, seed=1)
        for name, path in dirs.items():
            model, info = build_model(path, layout, dtype="fp32")
            logits = forward_logits(model, layout, info, tokens)
            exported = [(n, t.clone()) for n, t in iter_hf_weights(model, layout, info)]
            out[(tp, pp, ep, name)] = (logits, exported)
    layout.destroy()
    return out


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megacov.models.checkpoint import hf_to_mcore
    from megacov.tiny import build_moe_model

    root = tmp_path_factory.mktemp("moe")
    tokens = torch.randint(0, 67, (2, 20), generator=torch.Generator().manual_seed(5))
    dirs, refs, weights = {}, {}, {}
    for seed, (name, kw) in enumerate(MODELS.items()):
        dirs[name] = build_moe_model(str(root / name), vocab_size=67, seed=seed, **kw)
        hf = AutoModelForCausalLM.from_pretrained(dirs[name], dtype=torch.float32).eval()
        with torch.no_grad():
            refs[name] = hf(tokens).logits
        weights[name] = load_file(f"{dirs[name]}/model.safetensors")
    # the converted checkpoint is saved by 2 EP ranks and must load at every layout
    dirs["mixed_norm_mcore"] = str(root / "mixed_norm_mcore")
    hf_to_mcore(dirs["mixed_norm"], dirs["mixed_norm_mcore"], ep=2, progress=False, timeout_s=300)
    refs["mixed_norm_mcore"], weights["mixed_norm_mcore"] = refs["mixed_norm"], weights["mixed_norm"]
    return dirs, tokens, refs, weights


def _check(results: list, layouts: list, moe_models) -> None:
    dirs, _, refs, weights = moe_models
    for tp, pp, ep in layouts:
        for name in dirs:
            logits = [r[(tp, pp, ep, name)][0] for r in results]
            have = [x for x in logits if x is not None]
            assert have, f"{name} tp={tp} pp={pp} ep={ep}: no rank returned logits"
            for got in have:
                err = (got - refs[name]).abs().max().item()
                assert err <= TOL, f"{name} tp={tp} pp={pp} ep={ep}: logits differ by {err}"
            exported = dict(kv for r in results for kv in r[(tp, pp, ep, name)][1])
            assert set(exported) == set(weights[name]), f"{name} tp={tp} pp={pp} ep={ep}: export names"
            for key, tensor in weights[name].items():
                assert torch.equal(exported[key], tensor), f"{name} tp={tp} pp={pp} ep={ep}: {key} differs"


def test_moe_single_process(moe_models) -> None:
    dirs, tokens, _, _ = moe_models
    layouts = [(1, 1, 1)]
    _check(run_distributed(_worker, 1, layouts, dirs, tokens, timeout_s=300), layouts, moe_models)


def test_moe_layouts_of_two_ranks(moe_models) -> None:
    dirs, tokens, _, _ = moe_models
    layouts = [(1, 1, 2), (2, 1, 1), (1, 2, 1)]
    _check(run_distributed(_worker, 2, layouts, dirs, tokens, timeout_s=600), layouts, moe_models)


@pytest.mark.slow
def test_moe_tp2_ep2(moe_models) -> None:
    dirs, tokens, _, _ = moe_models
    layouts = [(2, 1, 2)]
    _check(run_distributed(_worker, 4, layouts, dirs, tokens, timeout_s=600), layouts, moe_models)


def test_moe_mcore_to_hf_round_trip(moe_models, tmp_path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from megacov.models.checkpoint import mcore_to_hf

    dirs, _, _, weights = moe_models
    out = str(tmp_path / "back")
    mcore_to_hf(dirs["mixed_norm_mcore"], out, progress=False)
    back = load_file(f"{out}/model.safetensors")
    assert set(back) == set(weights["mixed_norm"])
    assert all(torch.equal(back[k], v) for k, v in weights["mixed_norm"].items())
    with open(f"{dirs['mixed_norm']}/config.json") as fh:
        original = json.load(fh)
    with open(f"{out}/config.json") as fh:
        exported = json.load(fh)
    assert exported == original
    loaded = [{k: v for k, v in AutoConfig.from_pretrained(d).to_dict().items() if k != "_name_or_path"}
              for d in (out, dirs["mixed_norm"])]
    assert loaded[0] == loaded[1]


def test_dry_run_validates_expert_parallelism(tmp_path) -> None:
    from megacov.config import ConfigError, load_config
    from megacov.config.validate import ModelShape, plan_layout

    (tmp_path / "config.json").write_text(json.dumps(_hf(num_key_value_heads=2)))
    shape = ModelShape.from_hf_dir(str(tmp_path))
    assert shape.num_experts == 8
    ok = load_config(None, ["parallel.ep=2", "parallel.dp=2", "parallel.tp=2", "parallel.pp=2", "parallel.num_gpus=0"])
    plan = plan_layout(ok, shape)
    assert plan.ep == 2 and "EP=2" in plan.table()
    for overrides, message in [
        (["parallel.ep=2", "parallel.dp=3"], "parallel.ep=2 does not divide the data-parallel size 3"),
        (["parallel.ep=3", "parallel.dp=3"], "parallel.ep=3 does not divide the model's 8 experts"),
        (["parallel.ep=0"], "parallel.ep=0 must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            plan_layout(load_config(None, overrides + ["parallel.num_gpus=0"]), shape)
    dense = ModelShape(num_layers=4, num_heads=2, num_kv_heads=1, vocab_size=67, hidden_size=64,
                       architecture="Qwen3ForCausalLM")
    with pytest.raises(ConfigError, match="needs a mixture-of-experts model"):
        plan_layout(load_config(None, ["parallel.ep=2", "parallel.dp=2", "parallel.num_gpus=0"]), dense)


def test_weight_groups_cover_the_checkpoint_and_fuse_experts() -> None:
    from megacov.models.export import hf_weight_groups
    from megacov.models.loader import ModelInfo

    arch = arch_from_hf(_hf(mlp_only_layers=[1]), vocab_divisible_by=128)

    def info(offset: int, layers: int) -> ModelInfo:
        return ModelInfo(family="qwen3_moe", arch=arch, hf_config={}, source="hf", path="", dtype="float32",
                         tp=1, pp=2, pp_rank=offset // 2, layer_offset=offset, num_local_layers=layers)

    first, last = hf_weight_groups(info(0, 2)), hf_weight_groups(info(2, 2))
    names = [n for g in (first, last) for names in g.values() for n in names]
    assert sorted(names) == sorted(hf_tensor_shapes(arch, families()["qwen3_moe"].layer_rules))
    w13 = first["model.layers.0.mlp.experts.w13"]
    assert len(w13) == 16 and w13[:2] == ["model.layers.0.mlp.experts.0.gate_proj.weight",
                                          "model.layers.0.mlp.experts.0.up_proj.weight"]
    assert len(first["model.layers.0.mlp.experts.w2"]) == 8 and "model.layers.1.mlp.experts.w13" not in first
    assert first["model.layers.1.mlp.linear_fc1"] == ["model.layers.1.mlp.gate_proj.weight",
                                                      "model.layers.1.mlp.up_proj.weight"]
    assert "lm_head" in last and "model.embed_tokens" not in last
