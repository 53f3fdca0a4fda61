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
:class:`EngineRecovery` replaces the engines named by the fault (and any other that fails a liveness
check), keeps the healthy ones with their weights, re-forms the weight-transfer group and brings the
replacements to the actor's current weights; the caller then retries the work, at most
``rollout.max_engine_restarts`` times per run. A fault inside a weight sync is one of these: every
actor rank leaves the transfer together (:mod:`megacov.rollout.transfer`) and the driver learns
which engine caused it (:func:`settle`). A Megatron rank holds the only copy of its shard of the
weights and optimizer state: losing one ends the run (:class:`RankFault`), and the run's error
line names the last good checkpoint to resume from.

Ray is imported inside functions, so importing this module stays cheap.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

log = logging.getLogger("megacov.runtime")

T = TypeVar("T")


class RemoteFault(RuntimeError):
    """A remote process died or stopped answering during ``call``."""

    def __init__(self, who: str, call: str, kind: str, detail: str = "", note: str = "") -> None:
        self.who, self.call, self.kind, self.detail = who, call, kind, detail
        self.note = note
        super().__init__(f"{who} {kind} during {call}" + (f" ({detail})" if detail else "")
                         + (f"; {note}" if note else ""))

    def __reduce__(self) -> tuple[Any, ...]:
        # Raised inside an actor rank (the weight client) and unpickled on the driver: keep the fields.
        return type(self), (self.who, self.call, self.kind, self.detail, self.note)


class EngineFault(RemoteFault):
    """A rollout engine died or wedged; :class:`EngineRecovery` replaces it."""

    @property
    def engines(self) -> list[int]:
        """Indices of the engines named in ``who`` (``engine 1`` or ``engine 0, engine 2``)."""
        return sorted({int(i) for i in re.findall(r"engine (\d+)", self.who)})


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

    answers = _Answers(refs, timeout_s)
    results: list[Any] = [None] * len(answers.position)
    for i, ref in answers:
        try:
            results[i] = ray.get(ref)
        except RayActorError as exc:
            raise fault(names[i], call, "died", type(exc).__name__) from exc
        except Exception as exc:
            # A peer's death often reaches the survivors first, as a collective's error (gloo:
            # connection reset): name the process that died, when one did, rather than its symptom.
            dead = _first_dead(answers.pending, answers.position, names)
            if dead is not None:
                raise fault(dead[0], call, "died", dead[1]) from exc
            raise
    if answers.pending:
        raise fault(answers.who(names), call, "wedged", f"no answer in {timeout_s:g} s")
    return results


class _Answers:
    """The futures ``refs`` as they resolve, one at a time, until all have or ``timeout_s`` passes;
    ``pending`` then holds those that missed the deadline."""

    def __init__(self, refs: Sequence[Any], timeout_s: float | None) -> None:
        self.position = {ref: i for i, ref in enumerate(refs)}
        self.pending = list(refs)
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        import ray

        while self.pending:
            left = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
            ready, self.pending = ray.wait(self.pending, num_returns=1, timeout=left)
            if not ready:
                return
            yield self.position[ready[0]], ready[0]

    def who(self, names: Sequence[str]) -> str:
        return ", ".join(names[self.position[r]] for r in self.pending)


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


def settle(refs: Sequence[Any], names: Sequence[str], call: str, timeout_s: float | None,
           fault: type[RemoteFault]) -> list[Any]:
    """Like :func:`gather`, for calls whose processes fail *together* when one peer fails (a weight
    transfer: the survivors' receives break when the exporter gives up): a dead process raises
    ``fault`` at once; otherwise every answer is awaited until the deadline, and the cause is
    reported before its symptoms -- an :class:`EngineFault` raised inside any of the calls, then the
    processes that missed the deadline (``wedged``), then the first other error."""
    import ray
    from ray.exceptions import RayActorError

    answers = _Answers(refs, timeout_s)
    results: list[Any] = [None] * len(answers.position)
    errors: list[BaseException] = []
    for i, ref in answers:
        try:
            results[i] = ray.get(ref)
        except RayActorError as exc:
            raise fault(names[i], call, "died", type(exc).__name__) from exc
        except Exception as exc:  # noqa: BLE001 - classified below
            errors.append(exc)
    cause = next((f for f in map(find_fault, errors) if f is not None), None)
    if cause is not None:
        raise EngineFault(cause.who, cause.call, cause.kind, cause.detail) from errors[0]
    if answers.pending:
        raise fault(answers.who(names), call, "wedged", f"no answer in {timeout_s:g} s")
    if errors:
        raise errors[0]
    return results


def find_fault(exc: BaseException | None) -> EngineFault | None:
    """The :class:`EngineFault` behind ``exc`` (itself, a Ray task error's cause, or a ``__cause__``)."""
    seen = 0
    while exc is not None and seen < 16:
        if isinstance(exc, EngineFault):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
        seen += 1
    return None


class EngineRecovery:
    """Retries work that uses the engines after replacing the faulty ones, ``max_restarts`` times per run."""

    def __init__(self, runtime: Any, max_restarts: int, last_checkpoint: Callable[[], str | None]) -> None:
        self.runtime = runtime
        self.max_restarts = max_restarts
        self.last_checkpoint = last_checkpoint
        self.restarts = 0
        self.seconds: list[float] = []
        """Wall-clock seconds of every restart (kill, start, rendezvous, re-sync)."""
        self._reported = 0

    def run(self, what: str, work: Callable[[], T], before_retry: Callable[[], None] | None = None, *,
            catch_up: bool = True) -> T:
        """``work()``; on an :class:`EngineFault` replace the faulty engines, call ``before_retry`` (put
        back what the failed attempt consumed) and try again.

        ``catch_up``: the actor's weights are the ones the engines last completed a sync to, so the
        replacements receive them at once. ``False`` when ``work`` is itself the weight sync: the
        retried sync then brings every engine to the actor's new weights."""
        while True:
            try:
                return work()
            except EngineFault as exc:
                self.replace(what, exc, catch_up=catch_up)
                if before_retry is not None:
                    before_retry()

    def replace(self, what: str, exc: EngineFault, *, catch_up: bool = True) -> None:
        """Replace the engines ``exc`` names (and any other found dead or stale), keep the healthy ones,
        and bring the replacements to the current weights. A fault during the replacement itself (a
        replacement that dies during its catch-up sync) costs one more restart."""
        fault: EngineFault | None = exc
        while fault is not None:
            if self.restarts >= self.max_restarts:
                ckpt = self.last_checkpoint() or "none"
                raise EngineFault(fault.who, fault.call, fault.kind, fault.detail,
                                  f"rollout.max_engine_restarts={self.max_restarts} restarts used; "
                                  f"last good checkpoint: {ckpt}") from fault
            self.restarts += 1
            log.warning("%s in %s: replacing %s (restart %d of at most %d)", fault, what, fault.who or "the engines",
                        self.restarts, self.max_restarts)
            start = time.perf_counter()
            try:
                replaced = self.runtime.restart_engines(fault.engines, catch_up=catch_up)
                fault = None
            except EngineFault as again:  # e.g. a replacement that died in its catch-up sync
                replaced, fault = [], again
            self.seconds.append(time.perf_counter() - start)
        synced = f" and synced to weight version {self.runtime.weight_sync.version}" if catch_up and \
            getattr(self.runtime, "weight_sync", None) is not None else ""
        log.warning("engine(s) %s replaced (the others kept)%s in %.1f s; retrying %s",
                    replaced, synced, self.seconds[-1], what)

    @property
    def replaced(self) -> int:
        """Engines replaced so far (a restart replaces the faulty engines only)."""
        return int(getattr(self.runtime, "engines_replaced", 0))

    def step_metrics(self) -> dict[str, float]:
        """Totals of the run so far and the seconds spent recovering since the last call."""
        fresh = sum(self.seconds[self._reported:])
        self._reported = len(self.seconds)
        return {"engine/restarts": float(self.restarts), "engine/replaced": float(self.replaced),
                "engine/recovery_s": fresh}
