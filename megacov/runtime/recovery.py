"""Remote processes that die or wedge: detected at the call that hit them, named, and (engines) replaced.

Why here and not in each caller: every remote call of the driver -- an engine's ``generate`` /
``score``, an actor rank's ``update`` / ``log_probs`` -- gathers its Ray futures through
:func:`gather`, which waits with a deadline and turns the two faults a long job meets into one
typed error naming the process and the call:

* a process that is gone (SIGKILL, OOM killer, node loss) -> ``died``, raised as soon as *its*
  future resolves, without waiting for the peers that now block in a collective with it;
* a process that does not answer (SIGSTOP, a deadlock, a stuck collective) -> ``wedged`` once the
  call's timeout (from the config) passes.

Engines hold no state the run cannot rebuild -- their weights are the actor's -- so
:class:`EngineRecovery` replaces them (a fresh start of every engine, a new weight-transfer
rendezvous, a sync of the current weights) and the caller retries the work, at most
``rollout.max_engine_restarts`` times per run. A Megatron rank holds the only copy of its shard of
the weights and optimizer state: losing one ends the run (:class:`RankFault`), and the run's error
line names the last good checkpoint to resume from.

Ray is imported inside functions, so importing this module stays cheap.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

log = logging.getLogger("megacov.runtime")

T = TypeVar("T")


class RemoteFault(RuntimeError):
    """A remote process died or stopped answering during ``call``."""

    def __init__(self, who: str, call: str, kind: str, detail: str = "", note: str = "") -> None:
        self.who, self.call, self.kind, self.detail = who, call, kind, detail
        super().__init__(f"{who} {kind} during {call}" + (f" ({detail})" if detail else "")
                         + (f"; {note}" if note else ""))


class EngineFault(RemoteFault):
    """A rollout engine died or wedged; :class:`EngineRecovery` replaces the engines."""


class RankFault(RemoteFault):
    """A training rank died or wedged; the run ends (its shard of the state is gone)."""


#: How long a task error waits for a peer's death to surface before it is reported as it is.
DEATH_GRACE_S = 5.0


def gather(refs: Sequence[Any], names: Sequence[str], call: str, timeout_s: float | None,
           fault: type[RemoteFault]) -> list[Any]:
    """``ray.get(refs)`` with a deadline: a dead process raises ``fault`` at once, one that misses
    the deadline raises ``fault`` naming it; task errors (exceptions raised by the method) pass as
    they are. ``names[i]`` names the process behind ``refs[i]``."""
    import ray
    from ray.exceptions import RayActorError

    position = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(position)
    pending = list(refs)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not ready:
            who = ", ".join(names[position[r]] for r in pending)
            raise fault(who, call, "wedged", f"no answer in {timeout_s:g} s")
        i = position[ready[0]]
        try:
            results[i] = ray.get(ready[0])
        except RayActorError as exc:
            raise fault(names[i], call, "died", type(exc).__name__) from exc
        except Exception as exc:
            # A peer's death often reaches the survivors first, as a collective's error (gloo:
            # connection reset): name the process that died, when one did, rather than its symptom.
            dead = _first_dead(pending, position, names)
            if dead is not None:
                raise fault(dead[0], call, "died", dead[1]) from exc
            raise
    return results


def _first_dead(pending: Sequence[Any], position: dict, names: Sequence[str],
                grace_s: float = DEATH_GRACE_S) -> tuple[str, str] | None:
    """``(name, error)`` of a process behind ``pending`` that turns out dead within ``grace_s``."""
    import ray
    from ray.exceptions import RayActorError

    left, end = list(pending), time.monotonic() + grace_s
    while left and time.monotonic() < end:
        ready, left = ray.wait(left, num_returns=len(left), timeout=max(0.0, end - time.monotonic()))
        for ref in ready:
            try:
                ray.get(ref)
            except RayActorError as exc:
                return names[position[ref]], type(exc).__name__
            except Exception:  # noqa: BLE001 - another survivor's symptom; keep looking for the cause
                continue
    return None


class EngineRecovery:
    """Retries work that uses the engines after replacing them, ``max_restarts`` times per run."""

    def __init__(self, runtime: Any, max_restarts: int, last_checkpoint: Callable[[], str | None]) -> None:
        self.runtime = runtime
        self.max_restarts = max_restarts
        self.last_checkpoint = last_checkpoint
        self.restarts = 0
        self.seconds: list[float] = []
        """Wall-clock seconds of every restart (kill, start, rendezvous, re-sync)."""

    def run(self, what: str, work: Callable[[], T], before_retry: Callable[[], None] | None = None) -> T:
        """``work()``; on an :class:`EngineFault` replace the engines, call ``before_retry`` (put back
        what the failed attempt consumed) and try again."""
        while True:
            try:
                return work()
            except EngineFault as exc:
                self.replace(what, exc)
                if before_retry is not None:
                    before_retry()

    def replace(self, what: str, exc: EngineFault) -> None:
        """Kill every engine, start fresh ones, rendezvous and sync the actor's current weights."""
        if self.restarts >= self.max_restarts:
            ckpt = self.last_checkpoint() or "none"
            raise EngineFault(exc.who, exc.call, exc.kind, exc.detail,
                              f"rollout.max_engine_restarts={self.max_restarts} restarts used; "
                              f"last good checkpoint: {ckpt}") from exc
        self.restarts += 1
        log.warning("%s in %s: replacing the engines (restart %d of at most %d)", exc, what, self.restarts,
                    self.max_restarts)
        start = time.perf_counter()
        self.runtime.restart_engines()
        self.seconds.append(time.perf_counter() - start)
        log.warning("engines replaced and re-synced to weight version %d in %.1f s; retrying %s",
                    self.runtime.weight_sync.version, self.seconds[-1], what)
