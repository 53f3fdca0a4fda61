"""Two real RL steps on a simulated two-node cluster (network namespaces, as in
``test_cluster_multinode.py``), each node declaring fake GPUs to Ray.

Actor TP=2 x PP=2 (4 Megatron ranks) and 2 vLLM engines x TP=2, spread over both nodes; the run is
pinned to the CPU path (``parallel.num_gpus=0``) since no node has a real GPU. After each step's
sync the engines' prompt log-probs must equal Megatron's within 1e-3 (fp32), the step's
``rollout/logprob_diff_max`` must be <= 1e-4, and the runtime's plan names the transport per engine.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def rl_payload(nodes):
    """Runs in the driver on the head node: two RL steps, checks after each sync."""
    import torch

    from megacov.config import load_config
    from megacov.config.validate import validate
    from megacov.tiny import EXAMPLE_MODEL, build_model, write_task_data
    from megacov.trainer.batching import build_actor_batch, response_positions
    from megacov.trainer.loop import rl_step
    from megacov.trainer.run import RunContext
    from megacov.verify.sync import random_sequences

    root = tempfile.mkdtemp(prefix="mc2n-rl-")
    model = build_model(os.path.join(root, "model"), **EXAMPLE_MODEL)
    data = write_task_data(os.path.join(root, "data"), n_train=32, n_eval=4)
    cfg = load_config(os.path.join(REPO, "examples/tiny/config.yaml"), [
        f"model.path={model}", f"data.train_files=[{data['train']}]", "data.eval_files=[]", "data.sft_files=[]",
        f"trainer.output_dir={root}/runs", "trainer.name=two-node", "trainer.sft_steps=0", "trainer.total_steps=2",
        "trainer.eval_every=0", "logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.save_every=0",
        "checkpoint.export_hf=false", "parallel.tp=2", "parallel.pp=2", "parallel.num_gpus=0",
        "rollout.engines=2", "rollout.tp=2", "rollout.placement=disaggregated", "rollout.n=2",
        "data.batch_size=4", "data.mini_batch_size=4", "parallel.micro_batch_size=2",
        "rollout.max_response_len=6", "rollout.mismatch_sample=8", "model.dtype=fp32"])
    plan = validate(cfg)
    os.makedirs(os.path.join(root, "runs", "two-node"), exist_ok=True)
    ctx = RunContext(cfg, plan, os.path.join(root, "runs", "two-node"))
    out = {"steps": []}
    try:
        ctx.start()
        with open(os.path.join(model, "config.json")) as fh:
            seqs = random_sequences(json.load(fh)["vocab_size"], 4, 12, 0)
        batch, _ = build_actor_batch([s[:1] for s in seqs], [s[1:] for s in seqs], pad_id=ctx.pad_id)
        mask = response_positions([s[:1] for s in seqs], [s[1:] for s in seqs], batch.seq_len)
        for step in (1, 2):
            metrics = rl_step(ctx, step)
            actor_lp, _ = ctx.log_probs(batch, "actor")
            engine_lp = torch.tensor([v for row in ctx.engines.score(seqs) for v in row], dtype=torch.float64)
            diff = float((actor_lp[mask].double() - engine_lp).abs().max())
            out["steps"].append({"diff": diff, "logprob_diff_max": metrics.get("rollout/logprob_diff_max"),
                                 "version": ctx.engines.weight_states()[0]["version"]})
        sync = ctx.runtime.weight_sync
        out["routes"] = [[r.engine, r.node, r.backend] for r in sync.routes]
        out["engine_nodes"] = [i["node_ip"] for i in ctx.engines.infos]
        out["rank_nodes"] = sorted({i["ip"] for i in ctx.actor.infos})
        out["use_gpu"] = ctx.runtime.use_gpu
        out["cluster_gpus"] = ctx.runtime.cluster.gpus
    finally:
        ctx.close()
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_rl_steps_tp2_pp2_two_engines_tp2_across_two_nodes():
    pytest.importorskip("ray")
    from test_cluster_multinode import run_payload_on_two_nodes

    mode, res = run_payload_on_two_nodes(f"{os.path.abspath(__file__)}:rl_payload", cpus_per_node=6,
                                         gpus_per_node=2, timeout_s=800)
    print(mode, json.dumps(res, indent=1))
    assert res["cluster_gpus"] == 4 and not res["use_gpu"]  # declared fake GPUs; CPU path by parallel.num_gpus=0
    assert len(res["steps"]) == 2
    for i, s in enumerate(res["steps"], 1):
        assert s["version"] == i, s  # one sync per step through vLLM's lifecycle
        assert s["diff"] <= 1e-3, s
        assert s["logprob_diff_max"] is not None and s["logprob_diff_max"] <= 1e-4, s
    assert [r[2] for r in res["routes"]] == ["megacov_gloo", "megacov_gloo"]
    assert len(set(res["engine_nodes"]) | set(res["rank_nodes"])) == 2  # the job spans both nodes
