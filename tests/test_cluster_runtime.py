"""The runtime on a local Ray cluster that declares fake GPUs (this machine has none).

* a driver that sees no CUDA still plans the GPU path, because the cluster declares GPUs;
* colocated placement on the trainer's path schedules: ranks and engine workers share bundles
  (a rank and the engine worker of its bundle get the same GPU) and nobody waits for a CPU;
* with ``algorithm.kl_coef=0`` the runtime builds no reference policy (counted on the ranks).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fake_gpu_cluster():
    import ray

    temp_dir = tempfile.mkdtemp(prefix="mcrt-", dir="/tmp")
    ray.init(address="local", num_cpus=8, num_gpus=4, include_dashboard=False, _temp_dir=temp_dir,
             namespace="test-runtime", configure_logging=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _cfg(*overrides):
    from megacov.config import load_config
    from megacov.config.validate import plan_layout
    from megacov.tiny import prepare_example

    cfg = load_config(os.path.join(ROOT, "examples/tiny/config.yaml"), list(overrides))
    prepare_example(cfg)
    return cfg, plan_layout(cfg)


class GpuProbe:
    def gpu_ids(self):
        import ray

        return [str(g) for g in ray.get_gpu_ids()]


def test_cpu_driver_plans_gpu_path_and_colocated_bundles_schedule(fake_gpu_cluster):
    import ray
    import torch

    from megacov.rollout.engine import engine_actor_options
    from megacov.runtime.core import Runtime

    assert not torch.cuda.is_available()  # the driver is a CPU-only head
    cfg, plan = _cfg("parallel.tp=2", "parallel.dp=2", "rollout.engines=2", "rollout.tp=1",
                     "rollout.placement=colocated", "trainer.cpus_per_worker=1", "rollout.cpus_per_engine=1")
    runtime = Runtime(cfg, plan)
    try:
        runtime.connect()
        assert runtime.use_gpu and runtime.layout.shared and runtime.layout.bundles == 4
        actor = runtime.start_group(GpuProbe, backend="gloo")  # the ranks, as the trainer starts them
        rank_gpus = actor.group.execute("gpu_ids")
        spec = runtime.engine_spec(cfg.model.path)
        assert spec.use_gpu and spec.colocated
        engines = [ray.remote(GpuProbe).options(**engine_actor_options(spec, runtime.placement, e * spec.tp,
                                                                       shared=True)).remote()
                   for e in range(cfg.rollout.engines)]
        engine_gpus = ray.get([e.gpu_ids.remote() for e in engines], timeout=60)  # scheduled, no CPU wait
        assert engine_gpus == rank_gpus[:2]  # engine e shares rank e's GPU (bundle e)
        for e in engines:
            ray.kill(e)
    finally:
        runtime.close()


def test_kl_coef_zero_builds_no_reference(fake_gpu_cluster):
    from megacov.runtime.core import Runtime

    cfg, plan = _cfg("parallel.tp=1", "parallel.num_gpus=0", "algorithm.kl_coef=0.0")
    runtime = Runtime(cfg, plan)
    try:
        runtime.connect()
        assert not runtime.use_gpu  # parallel.num_gpus=0 forces CPU even on a GPU cluster
        actor = runtime.start_actor(cfg.model.path, total_updates=1)
        assert actor.built() == [{"actor": True, "reference": False}] * plan.world_size
        assert runtime.started == ["actor"]
    finally:
        runtime.close()
