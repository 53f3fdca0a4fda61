"""The runtime's planning half, without Ray: GPU decision, colocation check, transport choice,
reference skip; plus the dry run's one-line refusal of an over-subscribed colocated layout."""
from __future__ import annotations

import pytest

from megacov.config import ConfigError
from megacov.config.schema import MegacovConfig
from megacov.rollout.plan import choose_backend, route_engines, routes_table
from megacov.runtime.layout import BundleLayout, ClusterView, check_colocation, decide_gpu, needs_reference


def test_gpu_decision_reads_the_cluster_not_this_process():
    cfg = MegacovConfig()
    assert decide_gpu(cfg, ClusterView(cpus=8, gpus=16, nodes=2))  # a CPU-only driver, GPUs in the cluster
    assert not decide_gpu(cfg, ClusterView(cpus=8, gpus=0))
    cfg.parallel.num_gpus = 0
    assert not decide_gpu(cfg, ClusterView(cpus=8, gpus=16))  # forced CPU


def test_transport_per_engine_by_locality():
    routes = route_engines("auto", use_gpu=True, exporter_nodes=["a"], engine_nodes=["a", "b"], m2n=False)
    assert [r.backend for r in routes] == ["ipc", "nccl"]
    assert "engine on another node" in routes_table(routes)
    assert [r.backend for r in route_engines("auto", use_gpu=False, exporter_nodes=["a"],
                                             engine_nodes=["a", "b"])] == ["megacov_gloo"] * 2
    assert route_engines("auto", use_gpu=True, exporter_nodes=["a", "a"], engine_nodes=["a"], m2n=False,
                         pp=2)[0].backend == "megacov_gloo"
    with pytest.raises(ConfigError, match="rollout.sync_transport='nccl' needs GPUs"):
        choose_backend("nccl", use_gpu=False, same_node=True, m2n=False)
    with pytest.raises(ConfigError, match="must be one of"):
        choose_backend("object_store", use_gpu=True, same_node=True, m2n=False)


def test_colocated_bundles_hold_both_tenants_and_oversubscription_is_refused():
    cfg = MegacovConfig()
    cfg.trainer.cpus_per_worker, cfg.rollout.cpus_per_engine = 2, 1
    layout = BundleLayout.plan(cfg, world=4, use_gpu=True)
    assert layout.shared and layout.bundles == 4 and layout.bundle == {"CPU": 3.0, "GPU": 1.0}
    assert not BundleLayout.plan(cfg, world=4, use_gpu=False).shared  # CPU: engines have their own
    cfg.rollout.engines, cfg.rollout.tp = 3, 2
    with pytest.raises(ConfigError, match=r"rollout.engines\*rollout.tp=3\*2=6 exceeds the 4 training ranks"):
        check_colocation(cfg, 4)
    cfg.rollout.placement = "disaggregated"
    check_colocation(cfg, 4)


def test_reference_only_when_a_kl_term_reads_it():
    cfg = MegacovConfig()
    cfg.algorithm.kl_coef = 0.0
    for in_reward in (False, True):
        cfg.algorithm.use_kl_in_reward = in_reward
        assert not needs_reference(cfg)
    cfg.algorithm.kl_coef = 0.01
    for in_reward in (False, True):
        cfg.algorithm.use_kl_in_reward = in_reward
        assert needs_reference(cfg)


def test_dry_run_refuses_oversubscribed_colocation_in_one_line(capsys):
    from megacov.cli import main

    rc = main(["train", "examples/tiny/config.yaml", "parallel.num_gpus=8", "rollout.engines=4", "rollout.tp=2",
               "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "rollout.engines*rollout.tp=4*2=8" in err[0]
    rc = main(["train", "examples/tiny/config.yaml", "parallel.num_gpus=8", "rollout.engines=2", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "ipc" in out and "reference policy: skipped" in out


def test_gpu_check_skips_in_one_line_without_a_gpu():
    import os
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tools/gpu_check.sh runs the real checks there")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(["bash", os.path.join(root, "tools", "gpu_check.sh")], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().splitlines() == ["gpu_check: skipped (no CUDA GPU visible)"]


def test_vllm_engines_implement_the_rollout_backend_protocol():
    import inspect

    from megacov.rollout.backend import RolloutBackend
    from megacov.rollout.engine import RolloutEngines

    wanted = {n for n, v in vars(RolloutBackend).items() if inspect.isfunction(v) and not n.startswith("_")}
    assert wanted <= {n for n in dir(RolloutEngines) if callable(getattr(RolloutEngines, n))}
