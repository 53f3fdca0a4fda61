"""The global selection's pre-pass forward is skipped while the policy has not changed yet.

A real megatron GPT (one gloo rank) behind :meth:`ActorWorker.update`; a forward hook counts the
model's forward passes. Before the first optimiser step of an RL step the old log-probs are the
current ones, so a Clip-Cov update of one mini-batch needs no pre-pass; the second mini-batch
(after an optimiser step) does.
"""
from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

import torch

from megacov.parallel.spawn import run_distributed
from megacov.verify.exactness import RunOptions, TinySpec, full_weights, make_batch


class _Optim:
    """The optimiser interface update() uses; step() changes the weights like a real step would."""

    checks_overflow = False  # fp32: the worker checks the gradients itself

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.lr = [model], 0.0

    def zero_grad(self) -> None:
        for p in self.model[0].parameters():
            p.grad = None

    def step(self) -> tuple[bool, float]:
        with torch.no_grad():
            for p in self.model[0].parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-1e-2)
        return True, 0.0


def _worker(rank: int, world: int, batch_size: int, mini_batch_seqs: int, policy_loss: str) -> dict:
    from megacov.algorithms import algorithm_hparams
    from megacov.parallel.actor import compute_log_probs
    from megacov.parallel.layout import ParallelLayout
    from megacov.trainer.actor_worker import ActorWorker
    from megacov.verify.exactness import _build

    spec = TinySpec(vocab=67)
    w = full_weights(spec, 0)
    batch = make_batch(spec, w, batch_size=batch_size, seq_len=16, seed=0, temperature=1.0)
    layout = ParallelLayout.initialize(1, 1, seed=0)
    try:
        model, chunk = _build(spec, layout, RunOptions(), batch.seq_len, w)
        worker = ActorWorker.__new__(ActorWorker)
        hp = algorithm_hparams(policy_loss=policy_loss, clip_cov_ratio=0.1, clip_cov_lb=0.0)
        worker.cfg = SimpleNamespace(
            algorithm=hp, parallel=SimpleNamespace(micro_batch_size=mini_batch_seqs, logprob_workspace_mib=16.0,
                                                    max_tokens_per_micro_batch=None, pack_sequences=False),
            rollout=SimpleNamespace(temperature=1.0, max_response_len=batch.seq_len))
        worker.layout, worker.info, worker.optim = layout, SimpleNamespace(vocab_size=spec.vocab), _Optim(model)
        worker.router_load, worker._offload = None, None  # a dense model, never offloaded
        # old log-probs as the trainer computes them: the actor, on the micro-batches of the update
        parts = [compute_log_probs([chunk], layout, batch.rows(s, s + mini_batch_seqs), temperature=1.0,
                                   chunk_size=7, real_vocab_size=spec.vocab, with_entropy=False)[0]
                 for s in range(0, batch.batch_size, mini_batch_seqs)]
        batch = dataclasses.replace(batch, old_log_prob=torch.cat(parts))
        calls = []
        model.register_forward_hook(lambda *_: calls.append(1))
        outs = worker.update(batch, mini_batch_seqs, step=1, algo_cfg=hp)
        return {"forwards": len(calls), "prepass": [o["prepass_forwards"] for o in outs],
                "ppo_kl_first": outs[0]["ppo_kl"], "selected": [o["num_selected"] for o in outs]}
    finally:
        layout.destroy()


def test_first_mini_batch_needs_no_prepass():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    one = run_distributed(_worker, 1, 4, 4, "clip_cov", timeout_s=300)[0]
    # one mini-batch of one micro-batch: the training forward only, no pre-pass
    assert one["forwards"] == 1 and one["prepass"] == [0], one
    assert one["ppo_kl_first"] == 0.0 and one["selected"][0] > 0, one
    two = run_distributed(_worker, 1, 8, 4, "clip_cov", timeout_s=300)[0]
    # the second mini-batch comes after an optimiser step: its selection needs the pre-pass
    assert two["forwards"] == 3 and two["prepass"] == [0, 1], two
