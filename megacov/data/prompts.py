"""Prompt datasets: JSONL or Parquet rows -> tokenised prompts with their ground truth.

A row has a prompt (a string, or a chat message list ``[{"role": ..., "content": ...}, ...]``) and a
ground truth (a string or number, or a dict holding ``ground_truth``). Keys are configurable and may
be dotted (``extra_info.question``). DAPO-Math-17k rows -- ``prompt`` as a message list and the
answer under ``reward_model.ground_truth`` -- load with the default keys, because a missing answer
column falls back to ``reward_model``.

Everything that can be wrong with a row is found here, at load time, and reported with the file and
the 1-based row number: the training loop only ever sees well-formed records. ``data.on_bad_row``
decides whether a bad row stops the run (``error``) or is skipped and counted (``skip``). Prompts
longer than ``data.max_prompt_len`` tokens are not errors; they are filtered and counted.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

log = logging.getLogger(__name__)

#: Answer locations tried when the configured answer column is absent (DAPO / verl layout).
FALLBACK_ANSWER_KEYS = ("reward_model",)


class DataError(ValueError):
    """A dataset problem the user must fix; the message names the file and the row."""


@dataclass(frozen=True)
class PromptRecord:
    """One usable prompt. ``uid`` is its position in the dataset (stable across runs and resumes)."""

    uid: int
    source: str
    row: int
    prompt_ids: tuple[int, ...]
    question: str
    """The user-visible question text (what a judge model is shown)."""
    answer: str


@dataclass
class LoadReport:
    """What loading dropped, so the run log can say it instead of silently losing rows."""

    rows: int = 0
    kept: int = 0
    bad_rows: int = 0
    too_long: int = 0
    examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.kept} prompts kept of {self.rows} rows ({self.bad_rows} malformed skipped, "
                f"{self.too_long} longer than data.max_prompt_len)")


def iter_rows(path: str) -> Iterator[tuple[int, Any]]:
    """Yield ``(row_number, parsed_row)`` (1-based); a JSON syntax error yields a DataError object
    in place of the row so the caller applies the bad-row policy to it like to any other problem."""
    if not os.path.isfile(path):
        raise DataError(f"dataset file not found: {path}")
    if not os.access(path, os.R_OK):
        raise DataError(f"dataset file not readable (permissions): {path}")
    lower = path.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # noqa: BLE001 - any pyarrow failure means an unreadable file
            raise DataError(f"{path}: cannot read Parquet file: {exc}") from None
        yield from enumerate(rows, start=1)
        return
    if not lower.endswith((".jsonl", ".json")):
        raise DataError(f"{path}: unsupported dataset format (expected .jsonl or .parquet)")
    # Bytes, decoded line by line: a row that is not UTF-8 is one bad row (named, skippable), not a
    # decoding error that ends the whole file.
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, DataError(f"not UTF-8 text (byte {exc.start + 1} of the row is 0x{raw[exc.start]:02x})")
                continue
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, DataError(f"invalid JSON ({exc.msg} at column {exc.colno})")


def _lookup(row: dict, dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def _messages(value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError("empty prompt")
        return [{"role": "user", "content": value}]
    if isinstance(value, (list, tuple)) and value:
        out = []
        for i, msg in enumerate(value):
            if not (isinstance(msg, dict) and isinstance(msg.get("role"), str)
                    and isinstance(msg.get("content"), str)):
                raise DataError(f"prompt message {i} is not a {{'role': str, 'content': str}} mapping")
            out.append({"role": msg["role"], "content": msg["content"]})
        return out
    raise DataError(f"prompt must be a non-empty string or chat message list, got {type(value).__name__}")


def _answer(value: Any) -> str:
    if isinstance(value, dict):
        if "ground_truth" not in value:
            raise DataError("answer mapping has no 'ground_truth' entry")
        value = value["ground_truth"]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"answer must be a string or number, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise DataError("empty answer")
    return text


class PromptEncoder:
    """Turns a message list into prompt token ids, with the tokenizer's chat template if it has one.

    The template already contains the special tokens the model expects, so its output is encoded
    without adding more; a plain prompt is encoded with the tokenizer's usual special tokens.
    """

    def __init__(self, tokenizer: Any, use_chat_template: bool) -> None:
        self.tokenizer = tokenizer
        self.templated = bool(use_chat_template and getattr(tokenizer, "chat_template", None))

    def text(self, messages: list[dict[str, str]]) -> str:
        if self.templated:
            return str(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        return "\n\n".join(m["content"] for m in messages)

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.text(messages)
        ids = self.tokenizer(text, add_special_tokens=not self.templated)["input_ids"]
        return [int(t) for t in ids]


def parse_row(row: Any, prompt_key: str, answer_key: str) -> tuple[list[dict[str, str]], str]:
    """``(messages, answer)`` of one row, or DataError naming what is wrong with it."""
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise DataError(f"row is a {type(row).__name__}, expected an object")
    try:
        messages = _messages(_lookup(row, prompt_key))
    except KeyError:
        raise DataError(f"missing prompt field '{prompt_key}'") from None
    for key in (answer_key, *FALLBACK_ANSWER_KEYS):
        try:
            return messages, _answer(_lookup(row, key))
        except KeyError:
            continue
    raise DataError(f"missing answer field '{answer_key}'")


def scan_rows(path: str, prompt_key: str, answer_key: str, on_bad_row: str) -> LoadReport:
    """Check every row of one file without tokenising (what ``--dry-run`` does): DataError on the
    first bad row with ``on_bad_row=error``, else the count of bad rows; no usable row is an error."""
    report = LoadReport()
    for number, row in iter_rows(path):
        report.rows += 1
        try:
            parse_row(row, prompt_key, answer_key)
        except DataError as exc:
            if on_bad_row == "error":
                raise DataError(f"{path}: row {number}: {exc} (set data.on_bad_row=skip to skip such rows)") from None
            report.bad_rows += 1
            continue
        report.kept += 1
    if report.kept == 0:
        raise DataError(f"no usable rows in {path}: {report.rows} rows, {report.bad_rows} malformed")
    return report


def load_prompts(paths: Sequence[str], tokenizer: Any, *, prompt_key: str, answer_key: str,
                 max_prompt_len: int, on_bad_row: str, chat_template: bool,
                 report: Optional[LoadReport] = None) -> list[PromptRecord]:
    """Read, check and tokenise every row of ``paths`` (in order). Raises DataError on the first
    bad row when ``on_bad_row == 'error'``; with ``skip`` the rows are counted in ``report``."""
    if on_bad_row not in ("error", "skip"):
        raise DataError(f"data.on_bad_row='{on_bad_row}' must be 'error' or 'skip'")
    if not paths:
        raise DataError("no dataset files given")
    report = report if report is not None else LoadReport()
    encoder = PromptEncoder(tokenizer, chat_template)
    records: list[PromptRecord] = []
    for path in paths:
        for number, row in iter_rows(path):
            report.rows += 1
            try:
                messages, answer = parse_row(row, prompt_key, answer_key)
            except DataError as exc:
                where = f"{path}: row {number}: {exc}"
                if on_bad_row == "error":
                    raise DataError(where + " (set data.on_bad_row=skip to skip such rows)") from None
                report.bad_rows += 1
                if len(report.examples) < 5:
                    report.examples.append(where)
                continue
            ids = encoder.encode(messages)
            if len(ids) > max_prompt_len:
                report.too_long += 1
                continue
            question = next((m["content"] for m in reversed(messages) if m["role"] == "user"),
                            messages[-1]["content"])
            records.append(PromptRecord(uid=len(records), source=path, row=number, prompt_ids=tuple(ids),
                                        question=question, answer=answer))
    report.kept = len(records)
    if report.bad_rows:
        log.warning("skipped %d malformed row(s), e.g. %s", report.bad_rows, "; ".join(report.examples))
    if not records:
        raise DataError(f"no usable prompts in {', '.join(paths)}: {report.summary()}")
    return records
