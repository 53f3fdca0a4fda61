"""megacov: RL post-training for LLMs on Megatron-core, vLLM and Ray with exact Clip-Cov/KL-Cov.

Importing the package is cheap on purpose: megatron-core, vLLM and Ray are imported lazily inside
the functions that use them, so the CLI, the config tools and the pure algorithms start instantly.
"""
__version__ = "0.1.0"
