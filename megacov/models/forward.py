"""Full-vocabulary logits of a megatron chunk through megatron's own pipeline schedule.

Used by ``megacov verify conversion`` and the conversion tests to compare against transformers; it
runs the same forward path as training (``get_forward_backward_func`` with ``forward_only``), so a
mismatch here is a mismatch the trainer would see.
"""
from __future__ import annotations

from typing import Any

import torch

from megacov.models.loader import ModelInfo, unwrap


def forward_logits(model_chunk: Any, layout: Any, info: ModelInfo, tokens: torch.Tensor) -> torch.Tensor | None:
    """Logits ``[batch, seq, vocab_size]`` (padding columns dropped, fp32) for ``tokens`` ``[batch, seq]``.

    Collective over the model-parallel group: every rank of the layout must call it with the same
    tokens. The result is returned on TP rank 0 of the last stage and ``None`` elsewhere.
    """
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = unwrap(model_chunk)
    batch, seq = tokens.shape
    tokens = tokens.to(layout.device)
    positions = torch.arange(seq, device=layout.device).unsqueeze(0).expand(batch, seq)
    captured: list[torch.Tensor] = []

    def step(data_iterator: Any, module: Any) -> tuple[torch.Tensor, Any]:
        ids = next(data_iterator)
        out = module(ids, positions, attention_mask=None)

        def keep(output: torch.Tensor) -> tuple[torch.Tensor, dict]:
            captured.append(output.detach())
            return output.sum() * 0.0, {}

        return out, keep

    model.eval()
    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=step, data_iterator=iter([tokens]), model=[model],
                                    num_microbatches=1, seq_length=seq, micro_batch_size=batch,
                                    forward_only=True)
    if not layout.is_last_stage:
        return None
    local = captured[0].float().contiguous()
    if layout.tp > 1:
        parts = [torch.empty_like(local) for _ in range(layout.tp)]
        dist.all_gather(parts, local, group=layout.tp_group)
        local = torch.cat(parts, dim=-1)
    return local[..., :info.vocab_size].cpu() if layout.tp_rank == 0 else None
