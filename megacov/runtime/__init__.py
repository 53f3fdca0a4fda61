"""The one runtime: everything a job starts, built from the config and the layout plan.

:class:`~megacov.runtime.core.Runtime` joins (or starts) Ray, decides CPU or GPU from the cluster's
resources, lays out the bundles that ranks and engines share, starts the actor worker group (with
the reference policy only when a KL term uses it), the rollout engines and the weight sync. ``megacov
train``, ``megacov eval``, ``megacov verify sync``, the warm-start and the tests all build it; the
planning half (:mod:`megacov.runtime.layout`) runs without Ray for ``--dry-run``.

Nothing here is imported by ``import megacov``; Ray, vLLM and Megatron load inside methods.
"""
