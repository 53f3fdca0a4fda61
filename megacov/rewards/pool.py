"""Reward functions run in worker processes, so a hanging or crashing call can be killed.

A thread cannot be stopped and ``signal.alarm`` does not interrupt C code (sympy's worst cases sit in
C), so each call runs in a worker process; the parent watches a per-call deadline and kills the worker
that passes it, then starts a fresh one. An exception, a non-finite or non-numeric return, a timeout
or a dead worker all score 0 and are counted -- the step goes on, and the counts reach the metrics.

Workers import the reward function once, when they start (before any deadline runs), so import time
is never mistaken for a hang. This module imports neither torch nor anything heavy: the workers
stay small.
"""
from __future__ import annotations

import importlib
import inspect
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Optional, Sequence

#: Seconds a freshly started worker may take to import its reward function.
START_TIMEOUT_S = 120.0


class RewardSpecError(ValueError):
    """``reward.name`` does not resolve to a callable."""


def resolve(spec: str) -> Callable[..., Any]:
    """``module:function`` -> the function (ImportError / AttributeError become RewardSpecError)."""
    if ":" not in spec:
        raise RewardSpecError(f"reward '{spec}' is neither a registered name nor of the form module:function")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardSpecError(f"reward '{spec}' cannot be loaded: {exc} (a custom reward module must be importable: "
                              f"put its folder on PYTHONPATH)") from None
    except Exception as exc:  # noqa: BLE001 - a syntax or runtime error in the user's module
        raise RewardSpecError(f"reward '{spec}': importing {module_name} failed: {type(exc).__name__}: "
                              f"{exc}") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise RewardSpecError(f"reward '{spec}' cannot be loaded: module {module_name} has no '{attr}'")
    if not callable(fn):
        raise RewardSpecError(f"reward '{spec}' is not callable")
    return fn


def call_reward(fn: Callable[..., Any], response: str, answer: str, question: str) -> float:
    """Call ``fn(response, answer[, question=...])`` and check it returned a finite number."""
    params = inspect.signature(fn).parameters
    takes_question = "question" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    value = fn(response, answer, question=question) if takes_question else fn(response, answer)
    if isinstance(value, dict):
        value = value.get("score")
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"reward returned {value!r}, expected a finite number")
    return float(value)


@dataclass
class Outcome:
    score: float
    status: str  # ok | error | timeout
    detail: str = ""


def serve(conn: Connection, spec: str) -> None:
    """Worker main loop: import ``spec`` (and run its optional ``warmup``), then answer tasks."""
    try:
        fn = resolve(spec)
        warmup = getattr(fn, "warmup", None)
        if callable(warmup):
            warmup()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("start_failed", str(exc)))
        return
    conn.send(("ready", ""))
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        idx, args = task
        try:
            conn.send((idx, "ok", call_reward(fn, *args)))
        except Exception as exc:  # noqa: BLE001 - any failure scores 0 and is counted
            conn.send((idx, "error", f"{type(exc).__name__}: {exc}"[:300]))


class _Worker:
    """One reward process. Started as ``python -m megacov.rewards._worker SPEC FD`` rather than through
    multiprocessing's spawn, which would re-import the caller's ``__main__`` (user scripts without a
    ``__main__`` guard would then recurse); the parent's ``sys.path`` travels in PYTHONPATH so any
    ``module:function`` the driver can import, the worker can too."""

    def __init__(self, spec: str) -> None:
        parent, child = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen([sys.executable, "-m", "megacov.rewards._worker", spec, str(child.fileno())],
                                     pass_fds=(child.fileno(),), env=env, stdin=subprocess.DEVNULL)
        child.close()
        self.conn = Connection(parent.detach())
        self.task: Optional[int] = None
        self.deadline = 0.0

    def wait_ready(self, spec: str) -> None:
        try:
            if not self.conn.poll(START_TIMEOUT_S):
                raise RewardSpecError(f"reward worker for '{spec}' did not start within {START_TIMEOUT_S:.0f}s")
            kind, detail = self.conn.recv()
        except (EOFError, OSError):
            kind, detail = "start_failed", f"reward worker for '{spec}' exited while starting"
        except RewardSpecError:
            self.kill()
            raise
        if kind != "ready":
            self.kill()
            raise RewardSpecError(detail)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.conn.close()


class RewardPool:
    """``workers`` processes evaluating ``spec`` with a per-call timeout of ``timeout_s`` seconds."""

    def __init__(self, spec: str, workers: int, timeout_s: float) -> None:
        if workers < 1:
            raise ValueError(f"reward.workers={workers}: a pool needs at least one worker")
        self.spec, self.timeout_s = spec, float(timeout_s)
        self._workers = [_Worker(spec) for _ in range(workers)]
        for w in self._workers:
            w.wait_ready(spec)

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._workers[i] = _Worker(self.spec)
        self._workers[i].wait_ready(self.spec)

    def map(self, tasks: Sequence[tuple[str, str, str]]) -> list[Outcome]:
        """Score ``(response, answer, question)`` tasks; results in task order."""
        results: list[Optional[Outcome]] = [None] * len(tasks)
        pending = list(range(len(tasks)))[::-1]
        while pending or any(w.task is not None for w in self._workers):
            for w in self._workers:
                if w.task is None and pending:
                    w.task = pending.pop()
                    w.deadline = time.monotonic() + self.timeout_s
                    w.conn.send((w.task, tasks[w.task]))
            busy = [w for w in self._workers if w.task is not None]
            timeout = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = wait([w.conn for w in busy], timeout=timeout)
            for i, w in enumerate(self._workers):
                if w.task is None:
                    continue
                if w.conn in ready:
                    try:
                        idx, status, value = w.conn.recv()
                    except (EOFError, OSError):
                        results[w.task] = Outcome(0.0, "error", "reward worker died")
                        w.task = None
                        self._replace(i)
                        continue
                    results[idx] = Outcome(value, "ok") if status == "ok" else Outcome(0.0, "error", value)
                    w.task = None
                elif time.monotonic() >= w.deadline:
                    results[w.task] = Outcome(0.0, "timeout", f"exceeded reward.timeout_s={self.timeout_s:g}")
                    w.task = None
                    self._replace(i)
        return [r if r is not None else Outcome(0.0, "error", "lost") for r in results]

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
            try:
                w.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
            w.kill()
        self._workers = []

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

