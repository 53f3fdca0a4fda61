"""Reading the per-step metrics of a run: ``metrics.jsonl`` written by the trainer, or a JSONL/CSV export.

The reader is deliberately forgiving because the files it reads are often still being written (a live
run) or come from other frameworks: a half-written last line, a row that is not an object, a value
that is not a number or not finite are each skipped with a warning that names the file and line, and
everything else is kept. Rows are merged by step (eval metrics may arrive in their own row for the
same step); when a metric is logged twice for one step -- a resumed run repeats steps -- the later
value wins, because it belongs to the run that continued.
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

# Step columns tried in order when the caller does not name one; exports of W&B, TensorBoard and
# HF Trainer use the later names.
STEP_KEYS = ("step", "_step", "global_step", "trainer/global_step", "Step")
RUN_FILE_NAMES = ("metrics.jsonl", "metrics.csv")


class RunReadError(ValueError):
    """A run that cannot be read at all (missing path, no rows); the message names the path."""


@dataclass
class RunMetrics:
    """One run's metrics as ``key -> {step: value}``; non-finite values are kept as NaN here and
    dropped (and counted) by :meth:`series`, so the caller decides what a NaN means."""

    name: str
    source: str
    columns: dict[str, dict[float, float]] = field(default_factory=dict)
    n_rows: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        return sorted(self.columns)

    @property
    def steps(self) -> np.ndarray:
        all_steps: set[float] = set()
        for col in self.columns.values():
            all_steps.update(col)
        return np.array(sorted(all_steps), dtype=np.float64)

    def count(self, key: str) -> int:
        """Finite values logged under ``key``."""
        return int(sum(1 for v in self.columns.get(key, {}).values() if math.isfinite(v)))

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """Finite ``(steps, values)`` of ``key`` sorted by step (empty arrays if the key is absent)."""
        col = self.columns.get(key, {})
        pairs = sorted((s, v) for s, v in col.items() if math.isfinite(v))
        if not pairs:
            return np.zeros(0), np.zeros(0)
        arr = np.array(pairs, dtype=np.float64)
        return arr[:, 0], arr[:, 1]

    def non_finite(self, key: str) -> int:
        return int(sum(1 for v in self.columns.get(key, {}).values() if not math.isfinite(v)))

    def paired(self, x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(steps, x, y)`` at the steps where both keys have finite values."""
        xs, ys = self.columns.get(x_key, {}), self.columns.get(y_key, {})
        common = sorted(s for s in ys if s in xs and math.isfinite(xs[s]) and math.isfinite(ys[s]))
        steps = np.array(common, dtype=np.float64)
        return steps, np.array([xs[s] for s in common]), np.array([ys[s] for s in common])


def resolve_run_file(path: str) -> str:
    """A run directory's metrics file, or the file itself; RunReadError names what was looked for."""
    if os.path.isdir(path):
        for name in RUN_FILE_NAMES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise RunReadError(f"{path}: no {' or '.join(RUN_FILE_NAMES)} in this run directory")
    if os.path.isfile(path):
        return path
    raise RunReadError(f"{path}: no such file or run directory")


def run_name(path: str) -> str:
    """The run directory's name, or the file's stem for a free-standing export."""
    path = os.path.normpath(os.path.abspath(path))
    if os.path.isdir(path):
        return os.path.basename(path)
    stem, _ = os.path.splitext(os.path.basename(path))
    if stem == "metrics":
        return os.path.basename(os.path.dirname(path)) or stem
    return stem


def _as_float(value: object) -> float | None:
    """Numbers (and numeric strings, as in CSV) become floats; bools, blanks and text become None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            return float(text)
        except ValueError:
            return None
    return None


def _iter_jsonl(path: str, warnings: list[str]) -> Iterator[tuple[int, dict]]:
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        lines = fh.read().split("\n")
    # A file that ends with a newline yields one empty last element: that is not a truncated row.
    last = len(lines) - 1 if lines and lines[-1] == "" else len(lines)
    for lineno, line in enumerate(lines[:last], start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            what = "truncated last line" if lineno == last else f"unreadable line ({exc.msg})"
            warnings.append(f"{path}:{lineno}: skipped {what}")
            continue
        if not isinstance(row, dict):
            warnings.append(f"{path}:{lineno}: skipped a row that is not a JSON object")
            continue
        yield lineno, row


def _iter_csv(path: str, warnings: list[str]) -> Iterator[tuple[int, dict]]:
    with open(path, "r", encoding="utf-8", errors="replace", newline="") as fh:
        text = fh.read()
    reader = csv.DictReader(text.splitlines())
    rows = list(reader)
    n_fields = len(reader.fieldnames or [])
    for index, row in enumerate(rows):
        lineno = index + 2  # header is line 1
        short = None in row.values() or len([k for k in row if k is not None]) < n_fields
        if short or None in row:
            what = "truncated last line" if index == len(rows) - 1 else "row with the wrong number of fields"
            warnings.append(f"{path}:{lineno}: skipped {what}")
            continue
        yield lineno, row


def _pick_step_key(first_rows: Iterable[dict], step_key: str | None) -> str | None:
    if step_key:
        return step_key
    rows = list(first_rows)
    for key in STEP_KEYS:
        if any(key in row for row in rows):
            return key
    return None


def read_run(path: str, *, step_key: str | None = None, name: str | None = None) -> RunMetrics:
    """Read a run directory or a JSONL/CSV metrics file (format chosen by the ``.csv`` extension).

    Rows without a step get the next step after the previous row, so an export without a step
    column still plots in order; the warning says so once.
    """
    file_path = resolve_run_file(path)
    run = RunMetrics(name=name or run_name(path), source=file_path)
    reader = _iter_csv if file_path.lower().endswith(".csv") else _iter_jsonl
    try:
        rows = list(reader(file_path, run.warnings))
    except OSError as exc:
        raise RunReadError(f"{file_path}: cannot read ({exc.strerror or exc})") from exc
    key = _pick_step_key((r for _, r in rows[:50]), step_key)
    if key is None:
        run.warnings.append(f"{file_path}: no step column ({', '.join(STEP_KEYS)}); using row order")
    _merge_rows(run, rows, key, file_path)
    if run.n_rows == 0:
        raise RunReadError(f"{file_path}: no readable metric rows")
    return run


def _merge_rows(run: RunMetrics, rows: list[tuple[int, dict]], step_key: str | None, path: str) -> None:
    bad_values: dict[str, int] = {}
    missing_step = 0
    repeated = 0
    previous = -1.0
    for lineno, row in rows:
        step = _as_float(row.get(step_key)) if step_key else None
        if step is None or not math.isfinite(step):
            if step_key is not None:
                missing_step += 1
            step = previous + 1.0
        previous = step
        run.n_rows += 1
        for key, raw in row.items():
            if key == step_key or key is None:
                continue
            value = _as_float(raw)
            if value is None:
                if raw not in (None, "") and not isinstance(raw, (dict, list)):
                    bad_values[key] = bad_values.get(key, 0) + 1
                continue
            col = run.columns.setdefault(key, {})
            if step in col:
                repeated += 1
            col[step] = value
    for key, n in sorted(bad_values.items()):
        run.warnings.append(f"{path}: {n} non-numeric value(s) of '{key}' ignored")
    if missing_step:
        run.warnings.append(f"{path}: {missing_step} row(s) without a usable '{step_key}'; "
                            "placed after the previous row")
    if repeated:
        run.warnings.append(f"{path}: {repeated} metric value(s) logged again for an earlier step "
                            "(resumed run?); the later value is used")
