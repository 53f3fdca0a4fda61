"""What the loop and the weight sync need from a rollout backend, as a Protocol.

:class:`~megacov.rollout.engine.RolloutEngines` (vLLM in Ray actors) is the one implementation; a
second backend (e.g. SGLang) implements the same methods and the loop, the runtime and the sync do
not change. Control calls take ``timeout_s`` so a wedged engine surfaces at the call that hung; the
weight-update side is vLLM's client protocol (``weight_client()`` returns an object with
``init_weight_transfer_engine / start_weight_update / update_weights / finish_weight_update``), so an
engine replaced with ``replace`` rejoins through a new rendezvous while the others keep running.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class RolloutBackend(Protocol):
    count: int
    spec: Any
    infos: list[dict[str, Any]]

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], *, n: int, temperature: float, top_p: float,
                 top_k: int, max_tokens: int, stop: Sequence[str] | None = None,
                 seed: int | None = None) -> list[Any]:
        """Samples ordered by prompt, ``n`` consecutive per prompt."""

    def submit_generate(self, prompt_token_ids: Sequence[Sequence[int]], *, n: int, temperature: float,
                        top_p: float, top_k: int, max_tokens: int, stop: Sequence[str] | None = None,
                        seed: int | None = None) -> Any:
        """``generate`` started without waiting: an object whose ``result()`` returns its samples."""

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Prompt log-probs ``log p(seq[i] | seq[:i])``, i >= 1."""

    def weight_groups(self) -> dict[str, list[str]]:
        """Engine module -> HF tensor names loaded into it (fused groups)."""

    def weight_client(self, indices: Sequence[int] | None = None, timeout_s: float | None = None) -> Any:
        """A ``VLLMWeightSyncClient`` over engines ``indices`` (all by default) whose calls raise
        ``EngineFault`` naming an engine that died or missed ``timeout_s``."""

    def weight_states(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Per engine: ``index``, ``version``, ``consistent``, the workers' last update reports."""

    def set_weight_version(self, version: int, timeout_s: float | None = None) -> None: ...

    def sleep(self, level: int = 1, timeout_s: float | None = None) -> None: ...

    def wake_up(self, tags: list[str] | None = None, timeout_s: float | None = None) -> None: ...

    def restart(self, model_path: str | None = None) -> None: ...

    def replace(self, indices: Sequence[int]) -> None:
        """Fresh engines in place of ``indices``; the others keep running with their weights."""

    def health(self, indices: Sequence[int], timeout_s: float | None = None) -> dict[int, dict[str, Any] | None]:
        """Weight state of engines ``indices``; None for one that is dead or does not answer."""

    def probe(self, timeout_s: float | None = None) -> None: ...

    def shutdown(self) -> None: ...
