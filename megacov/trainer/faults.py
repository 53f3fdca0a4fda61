"""What a long run does when something outside the algorithm goes wrong.

* :class:`StopRequest`: SIGTERM (SLURM preemption, Kubernetes eviction) and SIGINT (Ctrl-C) become
  a request that the loop honours at its next safe point -- the end of a step, after its metrics row
  -- by saving a checkpoint and exiting 0, so a requeued job resumes where it stopped. A second
  SIGINT stops at once.
* :class:`NonFiniteGuard`: an update whose loss or gradients are not finite is skipped by the actor
  (weights untouched); every step with skips is warned about here, and ``trainer.max_skipped_steps``
  such steps in a row stop the run with :class:`NonFiniteStorm` instead of "finishing" with an
  unchanged policy.
* :func:`record_fatal`: the error that ends a run is written to ``train.log`` with its traceback,
  so the log of a job that died unattended says why.
"""
from __future__ import annotations

import logging
import os
import signal
import time
import traceback
from types import FrameType
from typing import Any, Callable, Optional

log = logging.getLogger("megacov.trainer")


class RunFailed(RuntimeError):
    """A run ended by an error at run time; the message is one line, the traceback is in train.log."""


class NonFiniteStorm(RuntimeError):
    """Too many consecutive steps whose updates were skipped as non-finite."""


class StopRequest:
    """SIGTERM / SIGINT -> ``requested`` (the loop saves and stops at its next safe point)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> None:
        """(Re-)install the handlers; called again after Ray's start-up, which sets its own. Only the
        main thread may install signal handlers: elsewhere (a run driven from a thread) this is a no-op."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        del frame
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            self.signal_name = signal.Signals(signum).name
            log.warning("%s received: the run saves a checkpoint after the current step and exits "
                        "(Ctrl-C again stops at once, unsaved)", self.signal_name)


class NonFiniteGuard:
    """Counts consecutive steps with skipped (non-finite) updates; ``max_steps=0`` only warns."""

    def __init__(self, max_steps: int, updates_per_step: int) -> None:
        self.max_steps = max_steps
        self.updates_per_step = updates_per_step
        self.streak = 0
        self.last_clean_step = 0

    def observe(self, step: int, metrics: dict[str, Any]) -> None:
        skipped = int(metrics.get("actor/skipped_updates") or 0)
        if skipped == 0:
            self.streak = 0
            self.last_clean_step = step
            return
        self.streak += 1
        limit = f"the run stops at {self.max_steps}" if self.max_steps > 0 else "trainer.max_skipped_steps=0"
        log.warning("step %d: %d of %d update(s) skipped because the loss or gradients were not finite "
                    "(reward/mean=%s); %d step(s) in a row with skips, %s", step, skipped, self.updates_per_step,
                    metrics.get("reward/mean"), self.streak, limit)
        if self.max_steps > 0 and self.streak >= self.max_steps:
            raise NonFiniteStorm(
                f"stopped at step {step}: updates were skipped as non-finite in {self.streak} consecutive steps "
                f"(trainer.max_skipped_steps={self.max_steps}); the last step with every update applied was "
                f"{self.last_clean_step}. Check the reward's range (reward/mean={metrics.get('reward/mean')}) and "
                f"optim.lr")


def record_fatal(run_dir: str, exc: BaseException) -> str:
    """Append the error and its traceback to ``<run_dir>/train.log``; returns the log's path."""
    path = os.path.join(run_dir, "train.log")
    stamp = time.strftime("%H:%M:%S")
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        with open(path, "a") as fh:
            fh.write(f"{stamp} ERROR megacov.trainer: run failed: {one_line(exc)}\n{text}")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:  # a full disk must not hide the original error
        pass
    return path


def one_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception (Ray wraps remote errors in many lines)."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def guarded(run_dir: str, body: Callable[[], int], bad_input: tuple[type[BaseException], ...],
            as_bad_input: Callable[[BaseException], BaseException]) -> int:
    """Run ``body``; every error that ends it is recorded in train.log. Bad input becomes
    ``as_bad_input(exc)`` (exit 2 in the CLI), anything else :class:`RunFailed` (one line, exit 1)."""
    try:
        return body()
    except bad_input as exc:
        record_fatal(run_dir, exc)
        raise as_bad_input(exc) from None
    except KeyboardInterrupt as exc:
        record_fatal(run_dir, exc)
        raise
    except Exception as exc:  # noqa: BLE001 - logged with its traceback, re-raised as one line
        path = record_fatal(run_dir, exc)
        raise RunFailed(f"{one_line(exc)} (traceback in {path})") from exc
