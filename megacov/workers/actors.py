"""The typed handle of the actor's worker group: what the driver may ask of the Megatron ranks.

:class:`~megacov.workers.group.WorkerGroup` is generic (any class, methods by name); the loop and
the runtime talk to :class:`ActorGroup`, whose methods are the actor's real operations. Every call
fans out to all ranks and takes a ``timeout_s`` (None waits), so a wedged rank surfaces as a
:class:`~megacov.runtime.recovery.RankFault` at the call that hung instead of a silent hang, and a
dead rank as one at once (not after its peers' collective times out).
"""
from __future__ import annotations

from typing import Any

from megacov.workers.group import WorkerGroup


class ActorGroup:
    """Ranks hosting :class:`~megacov.trainer.actor_worker.ActorWorker` (or any class with the same methods)."""

    def __init__(self, group: WorkerGroup, *, timeout_s: float | None = None) -> None:
        self.group = group
        self.timeout_s = timeout_s

    @property
    def world_size(self) -> int:
        return self.group.world_size

    @property
    def placement(self) -> Any:
        return self.group.placement

    @property
    def infos(self) -> list[dict[str, Any]]:
        return self.group.infos

    def _all(self, method: str, *args: Any, timeout_s: float | None = None, settled: bool = False,
             **kwargs: Any) -> list[Any]:
        """``settled``: the ranks fail together when an engine fails (the weight transfer): wait for
        all of them and report the engine fault one of them names (:func:`~megacov.runtime.recovery.settle`)."""
        from megacov.runtime.recovery import RankFault, gather, settle

        refs = self.group.execute_async(method, *args, **kwargs)
        return (settle if settled else gather)(refs, [f"actor rank {r}" for r in range(len(refs))], method,
                                               timeout_s or self.timeout_s, RankFault)

    # -- compute -----------------------------------------------------------------------------------

    def log_probs(self, batch_ref: Any, mini_batch_seqs: int, which: str) -> list[Any]:
        """Per rank: its DP replica's ``[(logp, entropy)]`` per mini-batch, or None on non-answering ranks."""
        return self._all("log_probs", batch_ref, mini_batch_seqs, which)

    def update(self, batch_ref: Any, mini_batch_seqs: int, *, step: int, controls: Any, algo_cfg: Any,
               epochs: int | None = None) -> list[dict[str, Any]]:
        """Metrics of every optimiser step (identical on every rank; rank 0's are returned)."""
        return self._all("update", batch_ref, mini_batch_seqs, step=step, controls=controls, algo_cfg=algo_cfg,
                         epochs=epochs)[0]

    # -- weights -----------------------------------------------------------------------------------

    def transfer_endpoints(self) -> list[tuple[int, str, int] | None]:
        return self._all("transfer_endpoint")

    def init_weight_transfer(self, info: dict[str, Any], client: Any, timeout_s: float | None = None) -> None:
        self._all("init_weight_transfer", info, client, timeout_s=timeout_s, settled=True)

    def send_weights(self, version: int, timeout_s: float | None = None) -> list[dict[str, Any] | None]:
        return self._all("send_weights", version, timeout_s=timeout_s, settled=True)

    def export_hf_shards(self, out_dir: str) -> list[dict[str, str] | None]:
        return self._all("export_hf_shard", out_dir)

    def offload(self) -> None:
        """Parameters, gradients, optimizer states (and the reference) to host memory (colocated GPU)."""
        self._all("offload")

    def reload(self) -> None:
        """Back on the device; a no-op when resident."""
        self._all("reload")

    def save_checkpoint(self, path: str, with_optimizer: bool) -> None:
        self._all("save_checkpoint", path, with_optimizer)

    def load_checkpoint(self, path: str) -> None:
        self._all("load_checkpoint", path)

    def state_fingerprint(self) -> list[float]:
        """Per rank: the sum of its parameters in float64 (tests compare weights across runs)."""
        return self._all("state_fingerprint")

    def built(self) -> list[dict[str, Any]]:
        """What each rank built (actor, reference): the runtime's accounting, used by tests."""
        return self._all("built")

    # -- lifetime ----------------------------------------------------------------------------------

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Tear the ranks down (waiting at most ``timeout_s`` for them to leave their groups), kill them."""
        self.group.shutdown(timeout_s=timeout_s)
