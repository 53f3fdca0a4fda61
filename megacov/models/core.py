"""Build a megatron-core ``GPTModel`` for one process of a given :class:`ParallelLayout`.

Model families (``megacov/models/<family>/``) turn an HF config into a ``TransformerConfig`` and a
layer spec; this module turns those into the model chunk that this rank owns (embedding only on the
first pipeline stage, output layer only on the last), with the layout's process groups passed in
explicitly. TransformerEngine's spec is used when TE is importable and CUDA is present; otherwise
megatron's local spec (pure PyTorch), which is what runs on CPU.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from megacov.parallel.layout import ParallelLayout


def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def layer_spec(normalization: str = "RMSNorm", qk_layernorm: bool = False, use_te: Optional[bool] = None) -> Any:
    """The local (pure PyTorch) spec, or TE's when available and not disabled."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    use_te = transformer_engine_available() if use_te is None else use_te
    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    return specs.get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)


def moe_block_spec(config: Any, pp_rank: int, use_te: Optional[bool] = None) -> Any:
    """Per-layer specs of this pipeline stage for a mixture-of-experts config: megatron picks the
    expert or dense layer spec from ``config.moe_layer_freq``. Experts are per-expert MLPs
    (``moe_grouped_gemm=False``), with TE linears when TE is used."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    use_te = transformer_engine_available() if use_te is None else use_te
    return get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization=config.normalization,
                                      pp_rank=pp_rank)


def build_gpt_model(
    config: Any,
    layout: ParallelLayout,
    *,
    vocab_size: int,
    max_sequence_length: int,
    spec: Any = None,
    share_embeddings_and_output_weights: bool = False,
    rotary_base: float = 10000.0,
    rope_scaling: bool = False,
    rope_scaling_factor: float = 8.0,
    seq_len_interpolation_factor: Optional[float] = None,
) -> torch.nn.Module:
    """This rank's chunk of a GPTModel. ``vocab_size`` is the size of the embedding/output table,
    i.e. the *padded* vocabulary (GPTModel does not pad; :mod:`megacov.models.arch` does)."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    spec = spec if spec is not None else layer_spec(config.normalization, bool(getattr(config, "qk_layernorm", False)))
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=layout.is_first_stage,
        post_process=layout.is_last_stage,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=int(rotary_base) if float(rotary_base).is_integer() else rotary_base,
        rope_scaling=rope_scaling,
        rope_scaling_factor=rope_scaling_factor,
        seq_len_interpolation_factor=seq_len_interpolation_factor,
        pg_collection=layout.pg_collection,
    )
    return model.to(layout.device)
