"""Entropy analytics: the entropy-performance law R = -a*exp(H) + b and entropy dynamics of runs.

Submodules, lightest first: ``fit`` (the law, numpy + SciPy on demand, safe to call from the
trainer), ``runs`` (reading metrics files), ``dynamics`` and ``summary`` (per-run numbers),
``synthetic`` (runs drawn from a known law, for tests and demos) and ``report`` (matplotlib figures
and the HTML report, imported only by ``megacov analyze``). Nothing here imports torch, vLLM, Ray or
megatron, and this package file imports nothing, so ``import megacov.analysis`` is free.
"""
