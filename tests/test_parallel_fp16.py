"""fp16 trains with fp32 main weights and a real loss scale through megatron's optimizer; a loss
scale on a non-fp16 run is refused naming the key."""
from __future__ import annotations

import pytest
import torch

PROMPTS = [[1, 5, 6], [1, 7]]
RESPONSES = [[11, 12, 13, 2], [14, 2]]


def _grad_norm(optim) -> float:
    return float(sum(b.grad_data.double().pow(2).sum() for c in optim.model for b in c.buffers) ** 0.5)


def _worker(rank: int, world: int, model_dir: str) -> dict:
    from megacov.config.schema import AlgorithmConfig, OptimConfig, ParallelConfig
    from megacov.models import build_model
    from megacov.parallel.actor import compute_log_probs, train_step
    from megacov.parallel.layout import ParallelLayout
    from megacov.parallel.optim import build_actor_optim
    from megacov.trainer.batching import build_actor_batch

    layout = ParallelLayout.initialize(1, 1, seed=1)
    kernel = dict(temperature=1.0, chunk_size=8)
    out: dict = {}
    model, info = build_model(model_dir, layout, dtype="fp32")
    try:
        build_actor_optim([model], layout, OptimConfig(loss_scale=128.0), ParallelConfig(), total_steps=1)
    except ValueError as exc:
        out["refused"] = str(exc)
    model, info = build_model(model_dir, layout, dtype="fp16")
    optim = build_actor_optim([model], layout, OptimConfig(lr=1e-3, loss_scale=1024.0), ParallelConfig(),
                              total_steps=2)
    out["checks_overflow"] = optim.checks_overflow
    out["loss_scale"] = optim.loss_scale
    parts = getattr(optim.optimizer, "chained_optimizers", None) or [optim.optimizer]
    out["main_dtypes"] = sorted({str(p.dtype) for o in parts for g in o.fp32_from_float16_groups for p in g})
    batch, _ = build_actor_batch(PROMPTS, RESPONSES, pad_id=0)
    lp, _ = compute_log_probs(optim.model, layout, batch, real_vocab_size=info.vocab_size, **kernel)
    batch.old_log_prob = lp.float()
    batch.advantages = torch.tensor([[0.5] * batch.seq_len, [-1.0] * batch.seq_len])
    step = dict(algo_cfg=AlgorithmConfig(), step=1, micro_batch_size=1, zero_grad_fn=optim.zero_grad,
                max_len=8, real_vocab_size=info.vocab_size, **kernel)
    train_step(optim.model, layout, batch, **step)
    scaled = _grad_norm(optim)
    grad_scale_func = optim.model[0].config.grad_scale_func
    optim.model[0].config.grad_scale_func = None  # the loss scale left out: gradients 1024x smaller
    train_step(optim.model, layout, batch, **step)
    out["ratio"] = scaled / _grad_norm(optim)
    optim.model[0].config.grad_scale_func = grad_scale_func
    train_step(optim.model, layout, batch, **step)
    before = [p.detach().clone() for p in model.parameters()]
    applied, grad_norm = optim.step()
    out["applied"], out["grad_norm"] = applied, grad_norm
    out["changed"] = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    out["param_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    # an overflow is the optimizer's to detect: the step is skipped, nothing changes
    optim.model[0].buffers[0].grad_data.fill_(float("inf"))
    before = [p.detach().clone() for p in model.parameters()]
    out["overflow_applied"] = optim.step()[0]
    out["overflow_unchanged"] = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    layout.destroy()
    return out


def test_fp16_is_loss_scaled_with_fp32_main_weights(tmp_path):
    from megacov.parallel.spawn import run_distributed
    from megacov.tiny import build_model

    model_dir = build_model(str(tmp_path / "m"), num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=2,
                            intermediate_size=64, vocab_size=40, seed=3)
    (r,) = run_distributed(_worker, 1, model_dir, timeout_s=600)
    assert "optim.loss_scale=128.0 is for model.dtype=fp16 only" in r["refused"]
    assert r["checks_overflow"] and r["loss_scale"] == 1024.0
    assert r["main_dtypes"] == ["torch.float32"] and r["param_dtypes"] == ["torch.float16"]
    assert r["ratio"] == pytest.approx(1024.0, rel=1e-2)
    assert r["applied"] and r["changed"] and r["grad_norm"] > 0
    assert not r["overflow_applied"] and r["overflow_unchanged"]
