"""Pure (single-process, no megatron) tests of the family tables, config mapping and weight mapping.

References are written independently of the code under test: megatron's fused QKV layout is built
head by head in a loop, TP shards are compared with the full tensor cut by hand.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from megacov.models import arch as arch_mod
from megacov.models import mapping
from megacov.models.family import UnsupportedModelError, detect_family, families, supported_architectures
from megacov.models.hf_io import CheckpointError, SafetensorsReader, ShardWriter, atomic_dir

HD = 4


def _dims(nh: int, ng: int, vocab: int = 11, padded: int = 16, tied: bool = False) -> mapping.Dims:
    return mapping.Dims(num_heads=nh, num_kv_heads=ng, head_dim=HD, vocab_size=vocab, padded_vocab_size=padded,
                        tie_word_embeddings=tied)


def _layer_tensors(dims: mapping.Dims, hidden: int = 8, ffn: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, kv = dims.num_heads * HD, dims.num_kv_heads * HD
    shapes = {
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden), "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.weight": (hidden, q), "self_attn.q_norm.weight": (HD,),
        "self_attn.k_norm.weight": (HD,), "mlp.gate_proj.weight": (ffn, hidden), "mlp.up_proj.weight": (ffn, hidden),
        "mlp.down_proj.weight": (hidden, ffn),
    }
    out = {f"model.layers.3.{k}": torch.randn(s, generator=g) for k, s in shapes.items()}
    out["model.embed_tokens.weight"] = torch.randn(dims.vocab_size, hidden, generator=g)
    out["lm_head.weight"] = torch.randn(dims.vocab_size, hidden, generator=g)
    out["model.norm.weight"] = torch.randn(hidden, generator=g)
    return out


def _reference_fused_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nh: int, ng: int) -> torch.Tensor:
    rows = []
    per = nh // ng
    for grp in range(ng):
        for h in range(grp * per, (grp + 1) * per):
            rows.append(q[h * HD:(h + 1) * HD])
        rows.append(k[grp * HD:(grp + 1) * HD])
        rows.append(v[grp * HD:(grp + 1) * HD])
    return torch.cat(rows, dim=0)


ALL_RULES = mapping.BASE_LAYER_RULES + mapping.QKV_BIAS_RULES + mapping.QK_NORM_RULES


@pytest.mark.parametrize("nh,ng", [(4, 4), (8, 2), (4, 1)])
def test_fused_qkv_matches_per_group_layout_and_splits_back(nh: int, ng: int) -> None:
    dims = _dims(nh, ng)
    hf = _layer_tensors(dims)
    for suffix in ("weight", "bias"):
        q, k, v = (hf[f"model.layers.3.self_attn.{p}_proj.{suffix}"] for p in "qkv")
        fused = mapping.hf_to_mcore_full(f"decoder.layers.3.self_attention.linear_qkv.{suffix}", hf, ALL_RULES, dims)
        assert torch.equal(fused, _reference_fused_qkv(q, k, v, nh, ng))
        back = mapping.mcore_to_hf(f"decoder.layers.3.self_attention.linear_qkv.{suffix}", fused, ALL_RULES, dims)
        assert [n for n, _ in back] == [f"model.layers.3.self_attn.{p}_proj.{suffix}" for p in "qkv"]
        for (_, t), ref in zip(back, (q, k, v)):
            assert torch.equal(t, ref)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_shards_merge_to_full_and_split_back_for_every_kind(tp: int) -> None:
    dims = _dims(8, 4)
    hf = _layer_tensors(dims)
    names = [f"decoder.layers.3.{r.mcore}" for r in ALL_RULES]
    names += ["embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight"]
    for name in names:
        kind = mapping.resolve(name, ALL_RULES, dims).rule.kind
        full = mapping.hf_to_mcore_full(name, hf, ALL_RULES, dims)
        shards = [mapping.hf_to_mcore_shard(name, hf, ALL_RULES, dims, r, tp) for r in range(tp)]
        assert torch.equal(mapping.merge_tp_shards(kind, shards), full), name
        for r in range(tp):
            assert torch.equal(mapping.split_tp(kind, full, r, tp, dims), shards[r]), (name, r)


def test_shards_hold_whole_groups_and_matching_gate_up_rows() -> None:
    dims = _dims(8, 2)
    hf = _layer_tensors(dims)
    q, k, v = (hf[f"model.layers.3.self_attn.{p}_proj.weight"] for p in "qkv")
    shard1 = mapping.hf_to_mcore_shard("decoder.layers.3.self_attention.linear_qkv.weight", hf, ALL_RULES, dims, 1, 2)
    # rank 1 of 2 owns query group 1: query heads 4..7, key/value head 1
    assert torch.equal(shard1, torch.cat([q[4 * HD:8 * HD], k[HD:2 * HD], v[HD:2 * HD]]))
    fc1 = mapping.hf_to_mcore_shard("decoder.layers.3.mlp.linear_fc1.weight", hf, ALL_RULES, dims, 1, 2)
    gate, up = hf["model.layers.3.mlp.gate_proj.weight"], hf["model.layers.3.mlp.up_proj.weight"]
    assert torch.equal(fc1, torch.cat([gate[6:], up[6:]]))
    proj = mapping.hf_to_mcore_shard("decoder.layers.3.self_attention.linear_proj.weight", hf, ALL_RULES, dims, 1, 2)
    assert torch.equal(proj, hf["model.layers.3.self_attn.o_proj.weight"][:, 16:])


def test_vocab_padding_is_zero_and_dropped_on_export() -> None:
    dims = _dims(4, 2, vocab=11, padded=16)
    hf = _layer_tensors(dims)
    emb = hf["model.embed_tokens.weight"]
    shards = [mapping.hf_to_mcore_shard("embedding.word_embeddings.weight", hf, ALL_RULES, dims, r, 4)
              for r in range(4)]
    assert [s.shape[0] for s in shards] == [4, 4, 4, 4]
    assert torch.equal(shards[2][:3], emb[8:11]) and not shards[2][3:].any()
    assert not shards[3].any()  # a rank holding only padding rows
    full = mapping.merge_tp_shards("vocab", shards)
    ((name, back),) = mapping.mcore_to_hf("embedding.word_embeddings.weight", full, ALL_RULES, dims)
    assert name == "model.embed_tokens.weight" and torch.equal(back, emb)
    bad = dict(hf, **{"model.embed_tokens.weight": torch.zeros(12, 8)})
    with pytest.raises(ValueError, match="vocab_size=11"):
        mapping.hf_to_mcore_full("embedding.word_embeddings.weight", bad, ALL_RULES, dims)


def test_names_te_aliases_tied_head_and_unknown_names() -> None:
    dims = _dims(4, 2, tied=True)
    local = mapping.resolve("decoder.layers.7.input_layernorm.weight", ALL_RULES, dims)
    te = mapping.resolve("decoder.layers.7.self_attention.linear_qkv.layer_norm_weight", ALL_RULES, dims)
    assert local.hf == te.hf == ("model.layers.7.input_layernorm.weight",)
    te_mlp = mapping.resolve("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", ALL_RULES, dims)
    assert te_mlp.hf == ("model.layers.0.post_attention_layernorm.weight",)
    assert mapping.resolve("output_layer.weight", ALL_RULES, dims).hf == ("model.embed_tokens.weight",)
    untied = mapping.resolve("output_layer.weight", ALL_RULES, _dims(4, 2)).hf
    assert untied == ("lm_head.weight",)
    with pytest.raises(mapping.MappingError, match="linear_qkv.weight"):
        mapping.resolve("decoder.layers.0.self_attention.linear_qkv.bias", mapping.BASE_LAYER_RULES, dims)
    with pytest.raises(mapping.MappingError, match="no mapping"):
        mapping.resolve("decoder.something", ALL_RULES, dims)


def test_family_tables_differ_only_where_the_models_differ() -> None:
    fams = families()
    assert set(fams) == {"llama", "qwen2", "qwen3", "mistral", "qwen3_moe"}
    names = {n: {r.mcore for r in f.layer_rules} for n, f in fams.items()}
    base = {r.mcore for r in mapping.BASE_LAYER_RULES}
    assert names["llama"] == names["mistral"] == base
    assert names["qwen2"] - base == {"self_attention.linear_qkv.bias"}
    assert names["qwen3"] - base == {"self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"}
    assert names["qwen3_moe"] - names["qwen3"] == {r.mcore for r in mapping.MOE_RULES}
    assert fams["qwen2"].qkv_bias and fams["qwen3"].qk_norm and not fams["llama"].qkv_bias
    assert fams["qwen3_moe"].moe is not None and fams["qwen3"].moe is None


def test_detect_family_and_unknown_architecture_lists_supported() -> None:
    for arch_name, fam in [("Qwen2ForCausalLM", "qwen2"), ("LlamaForCausalLM", "llama"),
                           ("Qwen3ForCausalLM", "qwen3"), ("MistralForCausalLM", "mistral")]:
        assert detect_family({"architectures": [arch_name]}).name == fam
    assert detect_family({"model_type": "qwen3"}).name == "qwen3"
    with pytest.raises(UnsupportedModelError) as exc:
        detect_family({"architectures": ["GPT2LMHeadModel"]})
    msg = str(exc.value)
    assert "GPT2LMHeadModel" in msg and all(a in msg for a in supported_architectures())


def _hf_cfg(**over: object) -> dict:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 96,
           "vocab_size": 67, "rms_norm_eps": 1e-5, "max_position_embeddings": 256, "hidden_act": "silu"}
    cfg.update(over)
    return cfg


def test_arch_reads_rope_from_both_transformers_generations() -> None:
    v5 = arch_mod.arch_from_hf(_hf_cfg(rope_parameters={"rope_theta": 5e5, "rope_type": "default"}),
                               vocab_divisible_by=128)
    v4 = arch_mod.arch_from_hf(_hf_cfg(rope_theta=5e5, rope_scaling=None), vocab_divisible_by=128)
    assert v5.rope_theta == v4.rope_theta == 5e5 and v5.rope_type == v4.rope_type == "default"
    llama31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    a = arch_mod.arch_from_hf(_hf_cfg(rope_theta=5e5, rope_scaling=llama31), vocab_divisible_by=128)
    assert (a.rope_type, a.rope_factor) == ("llama3", 8.0)
    kw = arch_mod.gpt_model_kwargs(a)
    assert kw["rope_scaling"] is True and kw["rope_scaling_factor"] == 8.0 and kw["rotary_base"] == 5e5
    lin = arch_mod.arch_from_hf(_hf_cfg(rope_parameters={"rope_theta": 1e4, "rope_type": "linear", "factor": 2.0}),
                                vocab_divisible_by=128)
    assert arch_mod.gpt_model_kwargs(lin)["seq_len_interpolation_factor"] == 2.0
    with pytest.raises(UnsupportedModelError, match="high_freq_factor"):
        arch_mod.arch_from_hf(_hf_cfg(rope_scaling=dict(llama31, high_freq_factor=2.0)), vocab_divisible_by=128)
    with pytest.raises(UnsupportedModelError, match="yarn"):
        arch_mod.arch_from_hf(_hf_cfg(rope_scaling={"rope_type": "yarn", "factor": 4.0}), vocab_divisible_by=128)


def test_arch_refuses_what_megatron_would_compute_differently() -> None:
    with pytest.raises(UnsupportedModelError, match="sliding_window"):
        arch_mod.arch_from_hf(_hf_cfg(architectures=["MistralForCausalLM"], sliding_window=32),
                              vocab_divisible_by=128)
    ok = arch_mod.arch_from_hf(_hf_cfg(architectures=["Qwen2ForCausalLM"], sliding_window=32,
                                       use_sliding_window=False), vocab_divisible_by=128)
    assert ok.qkv_bias and not ok.qk_norm
    with pytest.raises(UnsupportedModelError, match="attention_bias"):
        arch_mod.arch_from_hf(_hf_cfg(attention_bias=True), vocab_divisible_by=128)
    with pytest.raises(UnsupportedModelError, match="hidden_act"):
        arch_mod.arch_from_hf(_hf_cfg(hidden_act="gelu"), vocab_divisible_by=128)
    with pytest.raises(UnsupportedModelError, match="num_hidden_layers"):
        arch_mod.arch_from_hf({k: v for k, v in _hf_cfg().items() if k != "num_hidden_layers"},
                              vocab_divisible_by=128)


def test_vocab_padding_is_layout_independent_and_layout_checks_name_the_limit() -> None:
    assert arch_mod.padded_vocab(67, 128, 1) == arch_mod.padded_vocab(67, 128, 8) == 128
    assert arch_mod.padded_vocab(151936, 128, 4) == 151936 and arch_mod.padded_vocab(129, 128, 2) == 256
    assert arch_mod.padded_vocab(67, 128, 3) == 384
    mqa = arch_mod.arch_from_hf(_hf_cfg(num_key_value_heads=1), vocab_divisible_by=128)
    arch_mod.check_layout(mqa, 1, 2)
    with pytest.raises(UnsupportedModelError, match="num_key_value_heads=1"):
        arch_mod.check_layout(mqa, 2, 1)
    with pytest.raises(UnsupportedModelError, match="num_hidden_layers=2"):
        arch_mod.check_layout(mqa, 1, 4)
    q3 = arch_mod.arch_from_hf(_hf_cfg(architectures=["Qwen3ForCausalLM"], head_dim=32), vocab_divisible_by=128)
    assert q3.head_dim == 32 and q3.qk_norm  # head_dim need not be hidden_size / heads


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3", "mistral"])
def test_expected_hf_shapes_match_transformers_checkpoints(tmp_path, family: str) -> None:
    from megacov.models.loader import check_hf_weights, resolve_source
    from megacov.tiny import build_model

    d = build_model(str(tmp_path / family), architecture=family, num_layers=2, num_heads=4, num_kv_heads=2,
                    hidden_size=128, vocab_size=67, tie_word_embeddings=family == "qwen3")
    src = resolve_source(d)
    reader = check_hf_weights(d, src.arch)
    shapes = arch_mod.hf_tensor_shapes(src.arch, families()[family].layer_rules)
    stored = set(reader.keys()) - ({"lm_head.weight"} if src.arch.tie_word_embeddings else set())
    assert set(shapes) == stored
    cfg_path = Path(d, "config.json")
    cfg_path.write_text(json.dumps(dict(json.loads(cfg_path.read_text()), intermediate_size=64)))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight' has shape \(128, 128\)"):
        check_hf_weights(d, resolve_source(d).arch)


def test_lazy_safetensors_slices_give_the_same_shards(tmp_path, monkeypatch) -> None:
    from safetensors.torch import save_file

    from megacov.models import hf_io

    monkeypatch.setattr(hf_io, "_BLOCK_BYTES", 40)  # column slices read in many small row blocks
    dims = _dims(8, 4)
    hf = {k: (v.to(torch.bfloat16) if "mlp" in k else v) for k, v in _layer_tensors(dims).items()}
    half = sorted(hf)[: len(hf) // 2]
    save_file({k: hf[k] for k in half}, str(tmp_path / "a.safetensors"))
    save_file({k: hf[k] for k in hf if k not in half}, str(tmp_path / "b.safetensors"))
    index = {"weight_map": {k: ("a" if k in half else "b") + ".safetensors" for k in hf}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    reader = SafetensorsReader(str(tmp_path))
    for rule in ALL_RULES:
        name = f"decoder.layers.3.{rule.mcore}"
        for tp in (1, 2):
            for r in range(tp):
                assert torch.equal(mapping.hf_to_mcore_shard(name, reader, ALL_RULES, dims, r, tp),
                                   mapping.hf_to_mcore_shard(name, hf, ALL_RULES, dims, r, tp)), name
        if rule.kind == "qkv":  # assembled in place from lazy slices = the per-group reference layout
            q, k, v = (hf[f"model.layers.3.{h}"] for h in rule.hf)
            assert torch.equal(mapping.hf_to_mcore_shard(name, reader, ALL_RULES, dims),
                               _reference_fused_qkv(q, k, v, 8, 4)), name
    with pytest.raises(CheckpointError, match="not found"):
        reader["model.layers.0.mlp.up_proj.weight"]
    os.remove(tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match="b.safetensors"):
        SafetensorsReader(str(tmp_path))


def test_shard_writer_streams_planned_shards_in_any_order(tmp_path) -> None:
    from safetensors.torch import load_file

    tensors = {f"t{i}": torch.randn(16, 16).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(5)}
    plan = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}  # 1024 or 512 bytes each
    writer = ShardWriter(str(tmp_path), plan, max_shard_bytes=1600)
    for k in ["t3", "t0", "t4", "t1", "t2"]:
        writer.add(k, tensors[k].t().t())  # arrival order differs from the plan; views are fine
    with pytest.raises(ValueError, match="written twice"):
        writer.add("t0", tensors["t0"])
    weight_map = writer.finish()
    files = sorted(set(weight_map.values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map and index["metadata"]["total_size"] == 3 * 1024 + 2 * 512
    loaded = {}
    for f in files:
        loaded.update(load_file(str(tmp_path / f)))  # the reference reader validates our headers
    assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in tensors.items())
    (tmp_path / "short").mkdir()
    short = ShardWriter(str(tmp_path / "short"), {"a": ((2,), torch.float32), "b": ((2,), torch.float32)}, 1 << 20)
    short.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="planned"):
        short.add("b", torch.zeros(3))
    with pytest.raises(ValueError, match="never arrived"):
        short.finish()


def test_atomic_dir_leaves_nothing_on_failure_and_refuses_to_clobber(tmp_path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(str(out)) as tmp:
        open(os.path.join(tmp, "partial"), "w").close()
        raise RuntimeError("crash")
    assert os.listdir(tmp_path) == []
    with atomic_dir(str(out)) as tmp:
        open(os.path.join(tmp, "done"), "w").close()
    assert os.listdir(out) == ["done"]
    with pytest.raises(CheckpointError, match="already exists"), atomic_dir(str(out)):
        pass
    with atomic_dir(str(out), overwrite=True) as tmp:
        open(os.path.join(tmp, "new"), "w").close()
    assert os.listdir(out) == ["new"] and os.listdir(tmp_path) == ["out"]
