"""The PPO critic: an HF causal-LM backbone with a scalar value head, trained with DeepSpeed ZeRO.

It runs as its own Ray worker group beside the Megatron actor (the OpenRLHF layout: actor and
reference on Megatron, critic on DeepSpeed, rollouts on vLLM). :class:`~megacov.critic.group.CriticGroup`
is what the trainer holds; :class:`~megacov.critic.engine.CriticEngine` is the per-rank DeepSpeed
engine (usable directly under any initialised ``torch.distributed`` group, which is how the layout
tests run it). Nothing heavy is imported here.
"""
