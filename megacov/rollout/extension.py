"""Methods megacov adds to every vLLM worker (``worker_extension_cls``).

vLLM mixes this class into its worker class in every worker process of an engine (one per engine TP
rank); ``LLM.collective_rpc(name)`` calls a method on all of them. The weights themselves travel
through vLLM's weight-transfer engine (:mod:`megacov.rollout.transfer` on CPU); this extension only
describes the model and reports how the last update went.

Importing this module registers megacov's gloo engine in vLLM's factories: vLLM imports the
extension before it loads the model and creates the weight-transfer engine, so the registration
reaches every worker process even where the ``vllm.general_plugins`` entry point is not installed.
"""
from __future__ import annotations

from typing import Any

from megacov.rollout.transfer import register

register()


class WeightReceiver:
    """Mixed into ``vllm.v1.worker.*Worker``; ``self`` is the vLLM worker."""

    def megacov_weight_groups(self) -> dict[str, list[str]]:
        """Engine module -> HF tensor names loaded into it (see :class:`~megacov.rollout.buckets.FusionMap`)."""
        from megacov.rollout.engine_model import engine_fusion_map

        return engine_fusion_map(self.get_model()).to_dict()

    def megacov_update_report(self) -> dict[str, Any]:
        """How the last update went on this worker: tensors, load time, peak memory, and any problem."""
        engine = getattr(self, "weight_transfer_engine", None)
        report = getattr(engine, "report", None)
        if report is None:
            return {"tensors": 0, "load_s": 0.0, "problem": None, "peak_extra_bytes": None}
        return report()
