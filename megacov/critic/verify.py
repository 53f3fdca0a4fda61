"""Layout checks of the critic: the same updates under DP=1 and DP=N (ZeRO-2 / ZeRO-3, any
micro-batch size) must give the same weights, and a save + resume must continue bit-identically.

:func:`run_layout` spawns one gloo world of ``dp`` processes that builds a
:class:`~megacov.critic.engine.CriticEngine`, computes old values, runs ``updates`` optimizer steps
on a fixed ragged batch (``passes`` update calls of ``epochs`` passes each; optionally saving after the first batch pass and resuming in a fresh engine)
and writes rank 0's final weights to a safetensors file. The tests compare those files.
"""
from __future__ import annotations

import dataclasses
import os
import socket
from typing import Any, Optional

import torch


@dataclasses.dataclass(frozen=True)
class LayoutRun:
    init_dir: str
    out_file: str
    dp: int
    zero_stage: int
    micro_batch_size: int
    seqs_per_update: int = 4
    passes: int = 2
    resume_after: Optional[int] = None  # save after this many passes, rebuild the engine from it
    ckpt_dir: Optional[str] = None
    offload: bool = False
    lr: float = 1e-3
    epochs: int = 1  # critic passes per update call
    micro_mean: bool = False  # deliberately wrong normalisation (token mean per micro-batch), to show the check fails


def make_batch(vocab: int, rows: int = 8, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids, positions, a ragged response mask (one empty row) and returns."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    mask = torch.zeros(rows, length, dtype=torch.bool)
    for i in range(rows - 1):
        start = 2 + i % 3
        mask[i, start:length - (i % 4)] = True
    returns = torch.randn(rows, length, generator=g)
    pos = torch.arange(length).expand(rows, length).contiguous()
    return {"input_ids": ids, "position_ids": pos, "mask": mask, "returns": returns}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _engine(run: LayoutRun, resume: Optional[str]) -> Any:
    from megacov.config.schema import CriticConfig
    from megacov.critic.engine import CriticEngine, CriticShape

    class MicroMeanEngine(CriticEngine):
        def _loss_scale(self, mini_batch_tokens: float, micro_tokens: torch.Tensor) -> float:
            n = float(micro_tokens)
            return 1.0 / (n * self.shape.grad_accum) if n > 0 else 0.0

    cfg = CriticConfig(zero_stage=run.zero_stage, offload_optimizer=run.offload, lr=run.lr, dtype="fp32",
                       micro_batch_size=run.micro_batch_size, value_clip=0.2, clip_grad=1.0)
    return (MicroMeanEngine if run.micro_mean else CriticEngine)(cfg, run.init_dir, CriticShape(run.seqs_per_update, run.micro_batch_size, run.dp),
                        resume_dir=resume)


def _worker(rank: int, run: LayoutRun, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(run.dp), LOCAL_RANK="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=run.dp)
    try:
        from megacov.critic.engine import CriticEngine

        engine = _engine(run, None)
        vocab = int(engine.engine.module.backbone.config.vocab_size)
        b = make_batch(vocab)

        def all_values(e: CriticEngine) -> torch.Tensor:
            parts = [torch.zeros(0)] * run.dp
            dist.all_gather_object(parts, e.values(b["input_ids"], b["position_ids"]))
            return torch.cat(parts)

        old = all_values(engine)
        for p in range(run.passes):
            if run.resume_after is not None and p == run.resume_after:
                assert run.ckpt_dir is not None
                engine.save(run.ckpt_dir)
                del engine
                engine = _engine(run, run.ckpt_dir)
            engine.update(b["input_ids"], b["position_ids"], b["mask"], b["returns"], old, epochs=run.epochs)
        weights = engine.full_state_dict()
        weights["__values__"] = all_values(engine)
        weights["__updates__"] = torch.tensor([engine.updates])
        if rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in weights.items()}, run.out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_layout(run: LayoutRun) -> dict[str, torch.Tensor]:
    """Spawn the ``run.dp`` ranks, wait, and return rank 0's final weights (and values)."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    mp.start_processes(_worker, args=(run, _free_port()), nprocs=run.dp, start_method="spawn")
    return load_file(run.out_file)
