"""Supervised warm-start examples: a prompt followed by its ground-truth answer and EOS.

The warm-start trains the same Megatron actor on the same packed layout as RL (prompt tokens, then
response tokens under the response mask), so it needs no second training path: the response is the
answer text plus the tokenizer's EOS, which is exactly what the exact-answer reward later expects a
sampled response to look like.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from megacov.data.prompts import DataError, PromptRecord


@dataclass(frozen=True)
class SFTExample:
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]


def sft_examples(records: Sequence[PromptRecord], tokenizer: Any, max_response_len: int) -> list[SFTExample]:
    """One example per record; answers longer than ``max_response_len`` tokens (with EOS) are an error
    naming the row, because truncating them would teach the model to stop mid-answer."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; the warm-start cannot teach the model to stop")
    out = []
    for rec in records:
        ids = [int(t) for t in tokenizer(rec.answer, add_special_tokens=False)["input_ids"]] + [int(eos)]
        if len(ids) > max_response_len:
            raise DataError(f"{rec.source}: row {rec.row}: answer is {len(ids)} tokens with EOS, more than "
                            f"rollout.max_response_len={max_response_len}")
        out.append(SFTExample(prompt_ids=rec.prompt_ids, response_ids=tuple(ids)))
    return out
