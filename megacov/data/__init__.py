"""Prompt data: loading and checking JSONL/Parquet rows, the shuffled stream, and the SFT examples.

Pure Python plus a tokenizer: nothing here imports megatron, vLLM or Ray.
"""
from __future__ import annotations

from megacov.data.loader import PromptLoader
from megacov.data.prompts import DataError, LoadReport, PromptEncoder, PromptRecord, load_prompts
from megacov.data.sft import SFTExample, sft_examples

__all__ = ["DataError", "LoadReport", "PromptEncoder", "PromptLoader", "PromptRecord", "SFTExample",
           "load_prompts", "sft_examples", "load_from_config"]


def load_from_config(paths: list[str], tokenizer, data_cfg, report: LoadReport | None = None) -> list[PromptRecord]:
    """:func:`load_prompts` with the ``data`` section's keys, length limit and bad-row policy."""
    return load_prompts(paths, tokenizer, prompt_key=data_cfg.prompt_key, answer_key=data_cfg.answer_key,
                        max_prompt_len=data_cfg.max_prompt_len, on_bad_row=data_cfg.on_bad_row,
                        chat_template=data_cfg.chat_template, report=report)
