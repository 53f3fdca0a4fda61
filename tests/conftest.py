"""Fixtures shared by the end-to-end tests: a private local Ray and the embedded tiny task."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A private 4-CPU Ray for the module (4 logical CPUs: ranks and engines take turns on CPU)."""
    import ray

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="megacov", log_to_driver=False,
                   configure_logging=False)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


def tiny_task(root: str, reward_module: str, reward_source: str) -> Iterator[dict[str, Any]]:
    """The tiny model and addition data under ``root``, plus an importable reward module."""
    from megacov.tiny import EXAMPLE_MODEL, build_model, write_task_data

    build_model(os.path.join(root, "model"), **EXAMPLE_MODEL)
    paths = write_task_data(os.path.join(root, "data"), n_train=64, n_eval=8)
    with open(os.path.join(root, f"{reward_module}.py"), "w") as fh:
        fh.write(reward_source)
    sys.path.insert(0, root)
    try:
        yield {"root": root, "model": os.path.join(root, "model"), **paths}
    finally:
        sys.path.remove(root)


def task_overrides(tiny: dict[str, Any], name: str) -> list[str]:
    """The overrides every end-to-end run on :func:`tiny_task` shares: its files, its run folder, no
    warm-start, quiet logging."""
    return [f"model.path={tiny['model']}", f"data.train_files=[{tiny['train']}]",
            f"data.eval_files=[{tiny['eval']}]", "data.sft_files=[]", f"trainer.output_dir={tiny['root']}/runs",
            f"trainer.name={name}", "trainer.sft_steps=0", "logging.progress_bar=false",
            "logging.tensorboard=false"]
