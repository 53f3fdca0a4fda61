"""Driver-side pieces of the trainer that need no workers: checkpoint folders, metrics sinks, eval
metrics, batch packing, per-step metric combination, the warm-start loss and the tiny example files."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from megacov.algorithms.losses import LossNormalizer, get_policy_loss
from megacov.config import load_config
from megacov.trainer.batching import build_actor_batch, response_positions
from megacov.trainer.checkpoint import COMPLETE, CheckpointError, CheckpointManager, load_trainer_state
from megacov.trainer.evaluate import avg_pass_at_k, eval_metrics, unique_names
from megacov.trainer.metrics import MetricsLogger, plot_curves, read_jsonl
from megacov.trainer.rollout import step_seed
from megacov.trainer.sft import SFT_LOSS
from megacov.trainer.step_metrics import timing_metrics, update_metrics


def test_checkpoint_commit_is_atomic_and_latest_skips_partial(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=2)
    assert mgr.latest() is None and mgr.resolve_resume("auto") is None
    for step in (1, 2, 3):
        tmp = mgr.begin(step)
        open(os.path.join(tmp, "shard"), "w").close()
        mgr.commit(tmp, step, {"step": step, "loader": {"epoch": 0}})
    assert [s for s, _ in mgr.complete()] == [2, 3]  # keep_last=2 pruned step 1
    partial = mgr.begin(4)  # a save killed before its marker: invisible to resume, removed on start
    open(os.path.join(partial, "shard"), "w").close()
    os.makedirs(os.path.join(mgr.root, "step_00000009"))  # no COMPLETE marker either
    assert mgr.latest().endswith("step_00000003")
    assert mgr.remove_partial() == [".tmp-step_00000004"]
    assert load_trainer_state(mgr.latest())["step"] == 3
    with pytest.raises(CheckpointError, match="incomplete"):
        mgr.resolve_resume(os.path.join(mgr.root, "step_00000009"))
    with pytest.raises(CheckpointError, match="no such"):
        mgr.resolve_resume(str(tmp_path / "nope"))
    assert mgr.resolve_resume("never") is None
    assert os.path.isfile(os.path.join(mgr.latest(), COMPLETE))


def test_driver_rng_is_restored(tmp_path):
    import random

    mgr = CheckpointManager(str(tmp_path), keep_last=0)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    mgr.commit(mgr.begin(1), 1, {"step": 1})
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    load_trainer_state(mgr.latest())
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def _log_cfg(**kw):
    cfg = load_config(None, ["logging.progress_bar=false", "logging.tensorboard=false"]).logging
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_metrics_jsonl_resume_truncates_later_steps_and_plot(tmp_path):
    run = str(tmp_path)
    log = MetricsLogger(run, _log_cfg(), run_name="t", total_steps=4)
    for step in range(1, 5):
        log.log(step, {"actor/entropy": 1.0 / step, "reward/mean": 0.1 * step, "response/len_mean": 3.0,
                       "bad": float("nan")})
    log.close()
    with open(os.path.join(run, "metrics.jsonl"), "a") as fh:
        fh.write('{"step": 5, "actor/ent')  # a write cut by a kill
    rows = read_jsonl(os.path.join(run, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[0]["bad"] is None
    resumed = MetricsLogger(run, _log_cfg(), run_name="t", total_steps=4, start_step=2)
    resumed.log(3, {"reward/mean": 9.0})
    resumed.close()
    rows = read_jsonl(os.path.join(run, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["reward/mean"] == 9.0
    png = plot_curves(os.path.join(run, "metrics.jsonl"), os.path.join(run, "curves.png"))
    assert png and os.path.getsize(png) > 1000


def test_tensorboard_sink_writes_events(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    log = MetricsLogger(str(tmp_path), _log_cfg(tensorboard=True), run_name="t", total_steps=1)
    log.log(1, {"reward/mean": 0.5})
    log.close()
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))


def test_avg_and_pass_at_k():
    correct = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    assert avg_pass_at_k(correct) == (5 / 12, 2 / 3)
    m = eval_metrics({"a": correct, "b": np.ones((2, 4), bool)}, 4)
    assert m["val/a/avg@4"] == 5 / 12 and m["val/a/pass@4"] == 2 / 3 and m["val/b/pass@4"] == 1.0
    assert m["val/acc"] == pytest.approx((5 / 12 + 1) / 2) and "val/score" not in m
    graded = {"a": np.array([0.3, 1.0, 0.0, 0.3]), "b": np.array([1.0, 1.0])}
    m = eval_metrics({"a": np.array([[0, 1], [0, 0]], bool), "b": np.ones((1, 2), bool)}, 2, graded)
    assert m["val/a/score"] == pytest.approx(0.4) and m["val/b/score"] == 1.0
    assert m["val/score"] == pytest.approx(0.7) and m["val/acc"] == pytest.approx((0.25 + 1) / 2)
    assert unique_names(["d/aime.parquet", "x/aime.jsonl", "math.jsonl"]) == ["aime", "aime_2", "math"]
    with pytest.raises(ValueError):
        avg_pass_at_k(np.zeros((0, 4), bool))


def test_actor_batch_columns_follow_the_target_convention():
    batch, rlp = build_actor_batch([[5, 6], [7]], [[8, 9, 1], [1]], pad_id=0, train_rows=[True, False],
                                   rollout_logprobs=[[-0.1, -0.2, -0.3], [-0.4]])
    assert batch.input_ids.tolist() == [[5, 6, 8, 9, 1], [7, 1, 0, 0, 0]]
    assert batch.response_mask.tolist() == [[False, False, True, True, True], [False] * 5]
    assert rlp[0].tolist() == pytest.approx([0, 0, -0.1, -0.2, -0.3]) and rlp[1, 1].item() == pytest.approx(-0.4)
    assert response_positions([[5, 6], [7]], [[8, 9, 1], [1]], 5)[1].tolist() == [False, True, False, False, False]
    with pytest.raises(ValueError, match="rollout log-probs"):
        build_actor_batch([[5]], [[8, 9]], pad_id=0, rollout_logprobs=[[-0.1]])


def test_update_metrics_combination():
    outs = [{"pg_loss": 1.0, "ppo_kl": 0.0, "num_selected": 3, "cov/max": 2.0, "grad_norm": 1.0, "lr": 1e-3,
             "applied": 1.0, "selected_ids": [1, 2, 3]},
            {"pg_loss": 3.0, "ppo_kl": 0.5, "num_selected": 2, "cov/max": 5.0, "grad_norm": float("nan"),
             "lr": 2e-3, "applied": 0.0, "selected_ids": [4, 5]}]
    m = update_metrics(outs)
    assert m["actor/pg_loss"] == 2.0 and m["cov/num_selected"] == 5 and m["cov/max"] == 5.0
    assert m["actor/grad_norm"] == 1.0 and m["actor/lr"] == 2e-3 and m["actor/skipped_updates"] == 1
    assert m["actor/ppo_kl_first_update"] == 0.0 and m["actor/ppo_kl"] == 0.25
    t = timing_metrics({"rollout": 1.0, "update": 2.0, "eval": 5.0}, 10.0, tokens=100, generated=40)
    assert t["time/step"] == 5.0 and t["time/other"] == 2.0 and t["perf/tokens_per_s"] == 20.0


def test_step_seeds_never_overlap_between_calls():
    seeds = [step_seed(0, s, r) for s in range(1, 200) for r in range(5)]
    assert len(set(seeds)) == len(seeds)
    gaps = np.diff(sorted(seeds))
    assert gaps.min() >= 65_536  # engines add the prompt index to the call's seed


def test_sft_loss_is_token_mean_nll():
    lp = torch.tensor([[0.0, -1.0, -2.0], [0.0, -4.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[False, True, True], [False, True, False]])
    cfg = load_config(None, []).algorithm
    loss, metrics = get_policy_loss(SFT_LOSS)(lp, lp.detach(), torch.zeros(2, 3), mask,
                                              norm=LossNormalizer.from_mask(mask), selected=None, hp=cfg)
    assert loss.item() == pytest.approx(7 / 3)
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[0, -1 / 3, -1 / 3], [0, -1 / 3, 0]]))


def test_tiny_example_is_generated_only_inside_examples_tiny(tmp_path):
    from megacov.tiny import build_example, prepare_example

    root = tmp_path / "examples" / "tiny"
    cfg = load_config(None, [f"model.path={root}/model", f"data.train_files=[{root}/data/train.jsonl]",
                             f"data.eval_files=[{root}/data/eval.jsonl]", f"data.sft_files=[{root}/data/sft.jsonl]"])
    assert prepare_example(cfg) is True
    assert os.path.isfile(root / "model" / "config.json")
    prompts = {}
    for name in ("train", "eval", "sft"):
        with open(root / "data" / f"{name}.jsonl") as fh:
            prompts[name] = {json.loads(line)["prompt"] for line in fh}
    assert not (prompts["train"] & prompts["eval"]) and not (prompts["train"] & prompts["sft"])
    assert prepare_example(cfg) is False
    elsewhere = load_config(None, [f"model.path={tmp_path}/other/model"])
    assert prepare_example(elsewhere) is False and not os.path.exists(tmp_path / "other")
    assert build_example(str(root / "model"), str(root / "data"))["train"].endswith("train.jsonl")
    moe = load_config(None, [f"model.path={root}/moe-model"])  # examples/tiny/moe.yaml's policy
    assert prepare_example(moe) is True
    with open(root / "moe-model" / "config.json") as fh:
        moe_config = json.load(fh)
    assert (moe_config["model_type"], moe_config["mlp_only_layers"]) == ("qwen3_moe", [1])
