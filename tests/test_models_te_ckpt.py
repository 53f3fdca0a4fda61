"""Checkpoints cross between layer specs: TransformerEngine's ``_extra_state`` (absent from a
local-spec checkpoint) is left at its default, any other absent tensor is a one-line error.

TE itself needs CUDA; on CPU a module of the local model is given TE-style extra state (a
``get_extra_state`` / ``set_extra_state`` pair, which is how TE modules carry theirs), so the
checkpoint side of the mismatch is the real one: megatron's dist_checkpointing and sharded state."""
from __future__ import annotations

import os

import torch


def _with_extra_state(module: torch.nn.Module) -> list:
    """Give ``module`` TE-style extra state; returns the list of values it was asked to set."""
    received: list = []

    class WithExtraState(type(module)):  # type: ignore[misc, valid-type]
        def get_extra_state(self):
            return torch.tensor([7.0])

        def set_extra_state(self, state):
            received.append(state)

    module.__class__ = WithExtraState
    return received


def _worker(rank: int, world: int, model_dir: str, root: str) -> dict:
    from megatron.core import dist_checkpointing

    from megacov.models import CheckpointError, build_model, load_mcore_checkpoint
    from megacov.parallel.layout import ParallelLayout

    layout = ParallelLayout.initialize(1, 1, seed=1)
    for sub in ("local", "te_like", "partial"):
        os.makedirs(f"{root}/{sub}")
    out: dict = {}
    local, _ = build_model(model_dir, layout, dtype="fp32")
    dist_checkpointing.save(local.sharded_state_dict(), f"{root}/local")
    te_like, _ = build_model(model_dir, layout, load_weights=False, dtype="fp32")
    received = _with_extra_state(te_like.decoder.final_layernorm)
    out["extra_in_request"] = any(k.endswith("_extra_state") for k in te_like.sharded_state_dict())
    load_mcore_checkpoint(te_like, f"{root}/local")  # local-spec checkpoint -> TE-style model
    loaded = te_like.state_dict()
    out["equal"] = all(torch.equal(v, loaded[k]) for k, v in local.state_dict().items()
                       if isinstance(v, torch.Tensor) and not k.endswith("_extra_state"))
    out["extra_set"] = list(received)
    dist_checkpointing.save(te_like.sharded_state_dict(), f"{root}/te_like")
    plain, _ = build_model(model_dir, layout, load_weights=False, dtype="fp32")
    load_mcore_checkpoint(plain, f"{root}/te_like")  # and back
    out["back_equal"] = all(torch.equal(a, b) for a, b in zip(local.parameters(), plain.parameters()))
    # a checkpoint that lacks a real tensor: one line naming it
    partial = {k: v for k, v in local.sharded_state_dict().items() if "final_layernorm" not in k}
    dist_checkpointing.save(partial, f"{root}/partial")
    try:
        load_mcore_checkpoint(plain, f"{root}/partial")
        out["error"] = None
    except CheckpointError as exc:
        out["error"] = str(exc)
    layout.destroy()
    return out


def test_local_and_te_style_checkpoints_cross_load(tmp_path):
    from megacov.parallel.spawn import run_distributed
    from megacov.tiny import build_model

    model_dir = build_model(str(tmp_path / "m"), num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=2,
                            intermediate_size=64, vocab_size=40, seed=3)
    (r,) = run_distributed(_worker, 1, model_dir, str(tmp_path), timeout_s=600)
    assert r["extra_in_request"], "the TE-style model must ask for its _extra_state, or nothing is tested"
    assert r["equal"] and r["back_equal"]
    assert r["extra_set"] == []  # left at its default, not filled with something else
    err = r["error"]
    assert err is not None and "\n" not in err and "lacks decoder.final_layernorm.weight" in err, err
