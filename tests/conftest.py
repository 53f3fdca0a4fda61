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


#: A reward module's source for :func:`tiny_task`: the share of digit characters, dense enough for a
#: random tiny model to get varied rewards, so every update moves the policy.
DIGITS_REWARD = '''
def digits(response, answer):
    """Share of digit characters: dense enough for a random model to get varied rewards."""
    return sum(c.isdigit() for c in response) / 6.0
'''
#: Metric prefixes that depend on wall time: left out when two runs are compared.
VOLATILE = ("time/", "perf/", "timing/")


def stable_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row without its wall-time entries (what must match between equal runs)."""
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


def train_example(config: str, overrides: list[str]) -> None:
    """``megacov train`` in this process on ``examples/tiny/<config>`` with ``overrides``; it must exit 0."""
    from megacov.config import load_config
    from megacov.config.validate import validate
    from megacov.trainer import train

    cfg = load_config(os.path.join(ROOT, "examples", "tiny", config), overrides)
    assert train(cfg, validate(cfg)) == 0


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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def metric_rows(run_dir: str) -> dict[int, dict[str, Any]]:
    """The run's metrics.jsonl as {step: row}."""
    from megacov.trainer.metrics import read_jsonl

    return {r["step"]: r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))}


def safetensors_dir(path: str) -> dict[str, Any]:
    """Every tensor of the ``*.safetensors`` files in ``path`` (optimizer-state files left out)."""
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors") and not name.startswith("optim_"):
            out.update(load_file(os.path.join(path, name)))
    return out


def train_cli(tiny: dict[str, Any], ray_address: str, overrides: list[str],
              config: str = "examples/tiny/config.yaml") -> Any:
    """``megacov train CONFIG`` as its own process (a driver of the test's Ray cluster), in a
    session of its own so that it can be killed."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, tiny["root"]]), OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "megacov", "train", os.path.join(ROOT, config),
            *overrides, f"trainer.ray_address={ray_address}"]
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def wait_for_step(run_dir: str, step: int, proc: Any, timeout_s: float = 400) -> None:
    """Until ``step``'s metrics row is on disk; fails at once when ``proc`` exits first."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if step in metric_rows(run_dir):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run exited early ({proc.returncode}): {proc.stderr.read().decode()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout_s}s")


def addition_prompts(tmp_path: Any, count: int) -> tuple[Any, list[Any]]:
    """The tiny tokenizer and ``count`` prompts ``a+1=`` loaded through the data layer (for fake engines)."""
    import json

    from megacov.data import load_prompts
    from megacov.tiny import build_tokenizer

    tok = build_tokenizer()
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}+1=", "answer": str(a + 1)}) + "\n" for a in range(count)))
    recs = load_prompts([str(path)], tok, prompt_key="prompt", answer_key="answer", max_prompt_len=16,
                        on_bad_row="error", chat_template=True)
    return tok, recs


def private_ray(module: Any, num_cpus: int, namespace: str) -> Iterator[None]:
    """A private local Ray in a temp folder of its own, for a module whose worker classes must travel by
    value (the tests directory is no package). Use as ``yield from private_ray(...)`` in a fixture."""
    import shutil
    import tempfile

    import ray

    temp_dir = tempfile.mkdtemp(prefix="mc-", dir="/tmp")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir, namespace=namespace,
             configure_logging=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(module)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
