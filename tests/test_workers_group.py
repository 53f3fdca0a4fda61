"""The Ray worker group: one actor per rank, gloo joined on rank 0's node IP, calls ordered by rank."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest

pytestmark = pytest.mark.slow

CLUSTER_CPUS = 4


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    temp_dir = tempfile.mkdtemp(prefix="mcrw-", dir="/tmp")
    ray.init(address="local", num_cpus=CLUSTER_CPUS, include_dashboard=False, _temp_dir=temp_dir,
             namespace="test-workers", configure_logging=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


class ProbeWorker:
    def __init__(self, tag: str):
        import torch.distributed as dist

        self.tag = tag
        self.rank = dist.get_rank()

    def info(self) -> dict:
        import torch
        import torch.distributed as dist

        return {"tag": self.tag, "rank": dist.get_rank(), "world": dist.get_world_size(),
                "backend": dist.get_backend(), "master": os.environ["MASTER_ADDR"],
                "omp": os.environ.get("OMP_NUM_THREADS"), "threads": torch.get_num_threads(),
                "custom": os.environ.get("MEGACOV_TEST_VALUE"), "pid": os.getpid()}

    def allreduce(self, base: float) -> float:
        import torch
        import torch.distributed as dist

        t = torch.tensor([base * (self.rank + 1) + 10.0 ** self.rank], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def fail(self) -> None:
        raise ValueError(f"rank {self.rank} refuses")


def _rank_times_ten(worker: ProbeWorker, offset: int) -> int:
    return worker.rank * 10 + offset


def test_group_joins_gloo_on_rank0_node_ip_and_calls_by_rank(ray_cluster):
    from megacov.workers.cluster import node_ip
    from megacov.workers.group import WorkerGroup

    ray = ray_cluster
    free_before = ray.available_resources().get("CPU", 0)
    group = WorkerGroup(ProbeWorker, 3, args=("t",), cpus_per_worker=1, env={"MEGACOV_TEST_VALUE": "42"})
    try:
        infos = group.execute("info")
        assert [i["rank"] for i in infos] == [0, 1, 2]
        assert {i["world"] for i in infos} == {3} and {i["backend"] for i in infos} == {"gloo"}
        assert len({i["pid"] for i in infos}) == 3
        ip = node_ip()
        assert {i["master"] for i in infos} == {ip} and ip not in ("localhost", "::1")
        assert group.rendezvous[0] == ip
        assert {i["custom"] for i in infos} == {"42"}
        assert {i["omp"] for i in infos} == {"1"} and {i["threads"] for i in infos} == {1}
        assert group.execute("allreduce", 2.0) == [2.0 * 6 + 1 + 10 + 100] * 3
        assert group.execute_rank(2, "info")["rank"] == 2
        refs = group.execute_async("allreduce", 1.0)
        assert ray.get(refs) == [1.0 * 6 + 111] * 3
        assert ray.get(group.execute_rank_async(1, "info"))["tag"] == "t"
        assert group.execute_fn(_rank_times_ten, 3) == [3, 13, 23]
        with pytest.raises(ray.exceptions.RayTaskError, match="rank 1 refuses"):
            ray.get(group.execute_rank_async(1, "fail"))
        with pytest.raises(ray.exceptions.RayTaskError, match="rank 0: worker ProbeWorker has no method 'nope'"):
            group.execute_rank(0, "nope")
        # the group still works after a failed call
        assert group.execute("allreduce", 0.0) == [111.0] * 3
    finally:
        group.shutdown()
    import time

    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < free_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == free_before  # actors and placement released


def test_shared_placement_and_clear_errors(ray_cluster):
    from megacov.workers.group import BundleSpec, Placement, WorkerGroup

    placement = Placement(3, BundleSpec(cpus=1))
    try:
        with pytest.raises(ValueError, match="placement has 3 bundles"):
            WorkerGroup(ProbeWorker, 3, args=("x",), placement=placement, bundle_offset=1)
        group = WorkerGroup(ProbeWorker, 2, args=("s",), placement=placement, bundle_offset=1, cpus_per_worker=1)
        try:
            assert group.execute("allreduce", 1.0) == [1.0 * 3 + 11] * 2
        finally:
            group.shutdown()
        assert group.placement is placement  # not owned: left for its owner
    finally:
        placement.remove()
    with pytest.raises(RuntimeError, match="could not place 2 bundle"):
        Placement(2, BundleSpec(cpus=CLUSTER_CPUS), timeout_s=2)
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        WorkerGroup(ProbeWorker, 0)
