"""Where per-step metrics go: ``metrics.jsonl`` (always), TensorBoard (when installed), W&B (when
enabled), a progress bar, and a PNG of the curves at the end.

The JSONL file is the source of truth that ``megacov analyze`` and the plot read. On resume it is
rewritten without the rows after the checkpoint's step, so a run that was killed and continued leaves
the same file an uninterrupted run would (a half-written last line from the kill goes too). Each row
is on disk (fsync) before the step's checkpoint is committed, so a resumed run never lacks a row.

The W&B run id is kept in ``wandb_id.txt`` in the run folder, so a resumed run continues the same
W&B run instead of opening a new one.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Optional

log = logging.getLogger(__name__)

#: Metrics shown in the progress bar (short label -> key), in this order.
PROGRESS_KEYS = {"reward": "reward/mean", "acc": "reward/acc", "H": "actor/entropy",
                 "len": "response/len_mean", "val": "val/acc", "s/step": "time/step"}


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so the file stays valid JSON for every reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Rows of a metrics file; unparsable lines (a write cut by a kill) are dropped."""
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path) as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def truncate_jsonl(path: str, last_step: int) -> None:
    """Keep only rows with ``step <= last_step`` (atomically: temp file + rename)."""
    rows = [r for r in read_jsonl(path) if isinstance(r.get("step"), (int, float)) and r["step"] <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


WANDB_ID_FILE = "wandb_id.txt"


def wandb_run_id(run_dir: str, resuming: bool) -> str:
    """The W&B run id of this run folder: the stored one when resuming, else a new one (stored)."""
    import secrets

    path = os.path.join(run_dir, WANDB_ID_FILE)
    if resuming and os.path.isfile(path):
        with open(path) as fh:
            stored = fh.read().strip()
        if stored:
            return stored
    run_id = secrets.token_hex(4)
    with open(path, "w") as fh:
        fh.write(run_id + "\n")
    return run_id


class MetricsLogger:
    """Fan-out of ``log(step, metrics)`` to the enabled sinks."""

    def __init__(self, run_dir: str, logging_cfg: Any, *, run_name: str, total_steps: int, start_step: int = 0,
                 config: Optional[dict[str, Any]] = None) -> None:
        self.cfg = logging_cfg
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._jsonl = None
        if logging_cfg.jsonl:
            if start_step > 0:
                truncate_jsonl(self.path, start_step)
            elif os.path.exists(self.path):
                os.remove(self.path)
            self._jsonl = open(self.path, "a")
        self._tb = self._open_tensorboard(run_dir) if logging_cfg.tensorboard else None
        self._wandb = self._open_wandb(run_dir, run_name, config, start_step) if logging_cfg.wandb else None
        self._bar = None
        if logging_cfg.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=run_name, unit="step", dynamic_ncols=True)

    @staticmethod
    def _open_tensorboard(run_dir: str) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # noqa: BLE001 - tensorboard is optional
            log.info("tensorboard is not installed; metrics go to metrics.jsonl only")
            return None
        return SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def _open_wandb(self, run_dir: str, run_name: str, config: Optional[dict[str, Any]], start_step: int) -> Any:
        try:
            import wandb
        except ImportError:
            raise RuntimeError("logging.wandb=true but the wandb package is not installed "
                               "(pip install wandb, or set logging.wandb=false)") from None
        run_id = wandb_run_id(run_dir, resuming=start_step > 0)
        return wandb.init(project=self.cfg.wandb_project, name=run_name, config=config, id=run_id, resume="allow")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": int(step), **{k: _clean(float(v)) for k, v in metrics.items()}}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
            os.fsync(self._jsonl.fileno())
        numeric = {k: v for k, v in row.items() if k != "step" and v is not None}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def progress(self, step: int, metrics: dict[str, Any]) -> None:
        if self._bar is None:
            return
        shown = {label: f"{metrics[key]:.3g}" for label, key in PROGRESS_KEYS.items()
                 if key in metrics and metrics[key] is not None and math.isfinite(float(metrics[key]))}
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def plot_curves(metrics_path: str, out_png: str) -> Optional[str]:
    """Entropy, reward (and validation accuracy) and response length over steps, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)
    if not rows:
        return None

    def series(key: str) -> tuple[list[float], list[float]]:
        pts = sorted((r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)))
        return [p[0] for p in pts], [p[1] for p in pts]

    panels = [("token entropy", ["actor/entropy"]), ("reward / accuracy", ["reward/mean", "val/acc"]),
              ("response length (tokens)", ["response/len_mean"])]
    if any("critic/value_loss" in r for r in rows):  # PPO-GAE: how well the critic fits the returns
        panels.append(("critic (explained variance clipped at -1)",
                       ["critic/value_loss", "critic/explained_var", "critic/explained_var_last"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6))
    for ax, (title, keys) in zip(axes, panels):
        if title.startswith("critic"):
            ax.set_ylim(-1.0, 1.05)
            ax.axhline(0.0, color="grey", lw=0.5)
        for key in keys:
            xs, ys = series(key)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
