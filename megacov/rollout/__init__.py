"""Rollout side of megacov: vLLM engines in Ray actors, weight sync from Megatron, mismatch metric.

Only :mod:`megacov.rollout.buckets`, :mod:`megacov.rollout.memory` and :mod:`megacov.rollout.mismatch`
are pure; the engine, sync and verification modules import vLLM and Ray inside their functions.
"""
