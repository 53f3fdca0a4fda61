"""Colocated offload on CPU: the same code as on GPU, a real free/realloc round trip.

* torch module + Adam: storages freed while offloaded, parameters and moments bit-identical after,
  gradients back as zeros, views still attached; idempotent.
* megatron (DDP buffers, megatron optimizer) inside the actor worker, TP=2 on gloo: two training
  steps with offload/reload between every phase give the same metrics and weights, bit for bit, as
  two steps without, and the state really left (its storages are empty while offloaded).
"""
from __future__ import annotations

import copy

import torch

from megacov.parallel.offload import TrainStateOffload, free_cache


def _snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in model.parameters()]
    for state in opt.state.values():
        out += [v.clone() for v in state.values() if isinstance(v, torch.Tensor)]
    return out


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def test_round_trip_is_bit_identical_and_frees_the_storages():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    ref = torch.nn.Linear(8, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(4, 8)).square().sum().backward()
    opt.step()
    model(torch.randn(4, 8)).square().sum().backward()  # gradients present when offloaded
    views = [p.data for p in model.parameters()]
    before, ref_before = _snapshot(model, opt), ref.weight.detach().clone()
    off = TrainStateOffload([model, ref], [opt])
    freed = off.offload()
    assert off.offloaded and freed > 0
    assert all(p.untyped_storage().nbytes() == 0 for p in [*model.parameters(), *ref.parameters()])
    assert all(v.untyped_storage().nbytes() == 0 for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)
    assert off.offload() == 0  # idempotent
    free_cache()
    assert off.reload() == freed and not off.offloaded
    assert _equal(_snapshot(model, opt), before) and torch.equal(ref.weight, ref_before)
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())  # gradients come back zero
    assert all(v.data_ptr() == p.data_ptr() for v, p in zip(views, model.parameters()))
    assert off.reload() == 0
    # training continues from the reloaded state exactly as from the untouched one
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # deep: Adam shares a CPU "step" otherwise
    x = torch.randn(4, 8)
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    assert _equal(_snapshot(model, opt), _snapshot(twin, twin_opt))


def test_keep_grads_keeps_them():
    model = torch.nn.Linear(4, 2)
    model(torch.ones(1, 4)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    off = TrainStateOffload([model], keep_grads=True)
    off.offload()
    assert all(p.grad.untyped_storage().nbytes() == 0 for p in model.parameters())
    off.reload()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


PROMPTS = [[1, 5, 6], [1, 7], [1, 8, 9, 10], [1, 4]]
RESPONSES = [[11, 12, 13, 2], [14, 2], [15, 16, 17], [12, 12, 2]]


def _two_steps(rank: int, world: int, model_dir: str, offload: bool) -> dict:
    from megacov.config import load_config
    from megacov.trainer.actor_worker import ActorWorker
    from megacov.trainer.batching import build_actor_batch

    cfg = load_config(None, [f"model.path={model_dir}", "parallel.tp=2", "model.dtype=fp32", "optim.lr=1e-2",
                             "parallel.micro_batch_size=2", "algorithm.kl_coef=0.1"])
    worker = ActorWorker(cfg, model_dir, total_updates=2, with_reference=True)
    out: dict = {"metrics": [], "empty_while_offloaded": [], "fingerprints": []}
    gen = torch.Generator().manual_seed(5)
    for step in (1, 2):
        if offload:  # the engines would generate now
            freed = worker.offload()  # step 2: still offloaded since the end of step 1
            assert (freed > 0) == (step == 1)
            ddp = worker.model[0]
            out["empty_while_offloaded"].append(
                all(b.grad_data.untyped_storage().nbytes() == 0 for b in ddp.buffers)
                and all(p.untyped_storage().nbytes() == 0 for p in worker.ref.parameters())
                and all(p.untyped_storage().nbytes() == 0 for p in ddp.parameters()))
            worker.reload()
        batch, _ = build_actor_batch(PROMPTS, RESPONSES, pad_id=0)
        lp = worker.log_probs(batch, 4)
        ref = worker.log_probs(batch, 4, which="ref")
        if offload:
            worker.offload()  # reload happens inside update, as after the engines sleep
        if lp is not None:
            batch.old_log_prob, batch.ref_log_prob = lp[0][0], ref[0][0]
        else:  # TP rank 1: the same values arrive from rank 0 in the real run
            batch.old_log_prob = torch.zeros(batch.input_ids.shape)
        batch.advantages = torch.randn(batch.input_ids.shape, generator=gen)
        if lp is None:
            batch.ref_log_prob = torch.zeros(batch.input_ids.shape)
        import torch.distributed as dist

        for t in (batch.old_log_prob, batch.ref_log_prob):
            dist.broadcast(t, src=0)
        out["metrics"].append([{k: v for k, v in m.items() if not k.startswith("timing/")}
                               for m in worker.update(batch, 4, step=step)])
        out["fingerprints"].append(worker.state_fingerprint())
        if offload:
            worker.offload()  # after the weight push, before the KV cache comes back
    worker.reload()  # raw tensors must not be read while offloaded (their storages are empty)
    out["params"] = {n: p.detach().clone() for n, p in worker.model[0].named_parameters()}
    worker.close()
    return out


def test_two_steps_with_offload_between_phases_equal_two_without(tmp_path):
    from megacov.parallel.spawn import run_distributed
    from megacov.tiny import build_model

    model_dir = build_model(str(tmp_path / "m"), num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=2,
                            intermediate_size=64, vocab_size=40, seed=3)
    plain = run_distributed(_two_steps, 2, model_dir, False, timeout_s=600)
    moved = run_distributed(_two_steps, 2, model_dir, True, timeout_s=600)
    for a, b in zip(plain, moved):
        assert b["empty_while_offloaded"] == [True, True]
        assert a["metrics"] == b["metrics"]
        assert a["fingerprints"] == b["fingerprints"]
        assert a["params"].keys() == b["params"].keys()
        assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])
        assert a["fingerprints"][0] != a["fingerprints"][1]  # the steps changed the weights
