"""The DeepSpeed critic under ZeRO-2 / ZeRO-3 on gloo: DP=2 updates equal DP=1 updates (fp32, 1e-5),
with different micro-batch sizes, and a save + resume in a fresh engine continues bit-identically."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("deepspeed")

from megacov.critic.verify import LayoutRun, run_layout  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    from megacov.tiny import build_model

    return build_model(str(tmp_path_factory.mktemp("critic-init")), num_layers=2, hidden_size=64,
                       intermediate_size=128)


def _initial(init_dir):
    from transformers import AutoModel

    return {f"backbone.{k}": v for k, v in AutoModel.from_pretrained(init_dir).state_dict().items()}


def _max_diff(a, b):
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("stage,mbs_dp2", [(2, 1), (3, 2)])
def test_zero_dp2_equals_dp1(init_dir, tmp_path, stage, mbs_dp2):
    one = run_layout(LayoutRun(init_dir, str(tmp_path / "dp1.safetensors"), dp=1, zero_stage=stage,
                               micro_batch_size=4, passes=3))
    two = run_layout(LayoutRun(init_dir, str(tmp_path / "dp2.safetensors"), dp=2, zero_stage=stage,
                               micro_batch_size=mbs_dp2, passes=3))
    assert _max_diff(one, two) <= 1e-5
    init = _initial(init_dir)
    moved = max(float((one[k] - init[k]).abs().max()) for k in init)
    assert moved > 1e-3  # the updates really moved the backbone (the comparison is not of two no-ops)
    if stage == 2:  # the check can fail: a per-micro-batch token mean is not the mini-batch's token mean
        wrong = run_layout(LayoutRun(init_dir, str(tmp_path / "wrong.safetensors"), dp=2, zero_stage=stage,
                                     micro_batch_size=mbs_dp2, passes=3, micro_mean=True))
        assert _max_diff(one, wrong) > 1e-4


@pytest.mark.parametrize("stage,offload", [(2, True), (3, False)])
def test_save_resume_bit_identical(init_dir, tmp_path, stage, offload):
    """ZeRO-2 with the optimizer state offloaded to CPU memory, and ZeRO-3."""
    straight = run_layout(LayoutRun(init_dir, str(tmp_path / "a.safetensors"), dp=2, zero_stage=stage,
                                    micro_batch_size=2, passes=3, offload=offload))
    ckpt = tmp_path / "ckpt"
    resumed = run_layout(LayoutRun(init_dir, str(tmp_path / "b.safetensors"), dp=2, zero_stage=stage,
                                   micro_batch_size=2, passes=3, resume_after=1, ckpt_dir=str(ckpt),
                                   offload=offload))
    assert _max_diff(straight, resumed) == 0.0
    assert sorted(os.listdir(ckpt)) == ["critic_state.json", "model.safetensors", "optim_rank00000.safetensors",
                                       "optim_rank00001.safetensors"]


def test_epochs_repeat_the_mini_batch_steps(init_dir, tmp_path):
    """``epochs=2`` is two passes of one optimizer step per mini-batch (values clipped around the same
    old values): bit-identical to two one-pass updates, twice the steps of one, and not a no-op."""
    def run(name, passes, epochs):
        return run_layout(LayoutRun(init_dir, str(tmp_path / f"{name}.safetensors"), dp=1, zero_stage=2,
                                    micro_batch_size=2, passes=passes, epochs=epochs))

    once, twice, two_epochs = run("once", 1, 1), run("twice", 2, 1), run("epochs", 1, 2)
    assert int(once["__updates__"]) == 2 and int(two_epochs["__updates__"]) == 4  # 8 rows / 4 per update
    assert _max_diff(twice, two_epochs) == 0.0
    assert _max_diff(once, two_epochs) > 1e-4
