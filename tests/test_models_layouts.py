"""HF -> megatron at TP x PP in {1,2}^2 on gloo: logits match transformers, export is bit-exact.

One spawned job per world size runs every model through every layout of that size (re-initialising
megatron's parallel state between layouts), because starting processes that import megatron is what
costs time here. Models: every family; GQA and multi-head; tied and untied embeddings; one key/value
head; vocabulary 67 (not a multiple of any TP size, so padding is always exercised).
"""
from __future__ import annotations

import pytest
import torch

from megacov.parallel.spawn import run_distributed

TOL = 1e-4
MODELS = {
    "qwen2_gqa_untied": dict(architecture="qwen2", hidden_size=128, num_heads=4, num_kv_heads=2),
    "llama_mha_tied": dict(architecture="llama", hidden_size=64, num_heads=2, num_kv_heads=2, tie_word_embeddings=True),
    "qwen3_gqa_tied": dict(architecture="qwen3", hidden_size=128, num_heads=4, num_kv_heads=2, tie_word_embeddings=True),
    "mistral_gqa_untied": dict(architecture="mistral", hidden_size=128, num_heads=4, num_kv_heads=2),
    "qwen2_one_kv_head": dict(architecture="qwen2", hidden_size=128, num_heads=4, num_kv_heads=1),
}


def _save_like_training(model, ckpt: str, rank: int) -> None:
    """What the trainer writes: the model's sharded state next to optimizer-like tensors."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    fake = ShardedTensor.from_rank_offsets(f"optimizer.state.fake.rank{rank}", torch.ones(3), replica_id=0)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "optimizer": {"fake": fake}}, ckpt)


def _worker(rank: int, world: int, layouts: list, dirs: dict, tokens: torch.Tensor, ckpt: str = "") -> dict:
    from megatron.core import parallel_state

    from megacov.models import UnsupportedModelError, build_model, iter_hf_weights
    from megacov.models.forward import forward_logits
    from megacov.parallel.layout import ParallelLayout

    out: dict = {}
    layout = None
    for tp, pp in layouts:
        if layout is not None:
            parallel_state.destroy_model_parallel()  # keep the process group, change the layout
        layout = ParallelLayout.initialize(tp, pp, seed=1)
        for name, path in dirs.items():
            try:
                model, info = build_model(path, layout, dtype="fp32")
            except UnsupportedModelError as exc:
                out[(tp, pp, name)] = ("unsupported", str(exc))
                continue
            if ckpt and (tp, pp) == (1, 2) and name == "llama_mha_tied":
                _save_like_training(model, ckpt, rank)
            logits = forward_logits(model, layout, info, tokens)
            exported = [(n, t.clone()) for n, t in iter_hf_weights(model, layout, info)]
            meta = (info.layer_offset, info.num_local_layers, info.padded_vocab_size, layout.tp_rank, layout.pp_rank)
            out[(tp, pp, name)] = ("ok", logits, exported, meta)
    layout.destroy()
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megacov.tiny import build_model

    root = tmp_path_factory.mktemp("layouts")
    tokens = torch.randint(0, 67, (2, 24), generator=torch.Generator().manual_seed(3))
    dirs, refs, weights = {}, {}, {}
    for seed, (name, kw) in enumerate(MODELS.items()):
        dirs[name] = build_model(str(root / name), num_layers=4, vocab_size=67, seed=seed, **kw)
        hf = AutoModelForCausalLM.from_pretrained(dirs[name], dtype=torch.float32).eval()
        with torch.no_grad():
            refs[name] = hf(tokens).logits
        weights[name] = load_file(f"{dirs[name]}/model.safetensors")
    return dirs, tokens, refs, weights


def _check(results: list, layouts: list, models) -> None:
    dirs, _, refs, weights = models
    for tp, pp in layouts:
        for name in dirs:
            per_rank = [r[(tp, pp, name)] for r in results]
            if MODELS[name]["num_kv_heads"] % tp:
                assert all(p[0] == "unsupported" and "num_key_value_heads=1" in p[1] for p in per_rank)
                continue
            assert all(p[0] == "ok" for p in per_rank), (tp, pp, name)
            logits = [p[1] for p in per_rank if p[1] is not None]
            assert len(logits) == len(results) // (tp * pp)  # TP rank 0 of the last stage of each replica
            diff = (logits[0] - refs[name]).abs().max().item()
            assert diff <= TOL, f"{name} tp={tp} pp={pp}: max-abs logit difference {diff:.2e}"
            # Exported weights: only TP rank 0 of each stage yields; global layer names; bit-exact.
            exported: dict = {}
            for p in per_rank[: tp * pp]:
                tp_rank, pp_rank = p[3][3], p[3][4]
                if tp_rank:
                    assert p[2] == [], "non-zero TP ranks must yield nothing"
                for n, t in p[2]:
                    assert n not in exported, f"{n} exported twice"
                    exported[n] = t
                layers = {int(n.split(".")[2]) for n, _ in p[2] if n.startswith("model.layers.")}
                offset, count = p[3][0], p[3][1]
                assert not p[2] or layers == set(range(offset, offset + count)), (pp_rank, layers)
            orig = weights[name]
            assert set(exported) == set(orig) - ({"lm_head.weight"} if MODELS[name].get("tie_word_embeddings") else set())
            for n, t in exported.items():
                assert t.dtype == orig[n].dtype and torch.equal(t, orig[n]), f"{name} tp={tp} pp={pp}: {n} differs"


def test_layouts_of_two_ranks(models, tmp_path) -> None:
    from megacov.models.checkpoint import mcore_to_hf

    layouts = [(1, 1), (2, 1), (1, 2)]
    dirs, tokens, _, weights = models
    ckpt = tmp_path / "trained"
    ckpt.mkdir()
    results = run_distributed(_worker, 2, layouts, dirs, tokens, str(ckpt), timeout_s=600)
    _check(results, layouts, models)
    # A checkpoint saved the way training saves it (PP=2, tied head on the last stage, optimizer
    # tensors beside the model) exports back to the original weights given the HF model it came from.
    mcore_to_hf(str(ckpt), str(tmp_path / "exported"), hf_dir=dirs["llama_mha_tied"], progress=False)
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert set(exported) == set(weights["llama_mha_tied"]) - {"lm_head.weight"}
    assert all(torch.equal(exported[k], weights["llama_mha_tied"][k]) for k in exported)


@pytest.mark.slow
def test_tp2_pp2(models) -> None:
    dirs, tokens, _, _ = models
    results = run_distributed(_worker, 4, [(2, 2)], dirs, tokens, timeout_s=600)
    _check(results, [(2, 2)], models)
