"""Rollout side of megacov: vLLM engines in Ray actors, weight sync from Megatron, mismatch metric.

Only :mod:`megacov.rollout.buckets`, :mod:`megacov.rollout.memory`, :mod:`megacov.rollout.mismatch`
and :mod:`megacov.rollout.plan` are pure; the engine, transfer and sync modules import vLLM and Ray
(the transfer and source modules at import, the others inside their functions).
"""
