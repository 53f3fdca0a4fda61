"""Real megatron-core on CPU processes over gloo: resharding checkpoints and training steps are layout-exact.

A tiny GPTModel is initialised at TP=1, saved with megatron ``dist_checkpointing`` and loaded at
TP=2, PP=2 and TP=2 x PP=2: logits and loss must match TP=1 within 1e-5 (fp32). Then one optimiser step
through ``get_forward_backward_func`` + megatron DDP + megatron's optimizer at each layout must give the
weights the TP=1 step gives (compared after resharding every result back to TP=1).
"""
from __future__ import annotations

import os

import pytest
import torch

from megacov.parallel.spawn import run_distributed

VOCAB = 128
SEQ = 16
LAYERS = 2


def _tf_config(tp: int, pp: int):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=LAYERS, hidden_size=64, num_attention_heads=2, num_query_groups=2, ffn_hidden_size=128,
        use_cpu_initialization=True, normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False,
        activation_func=torch.nn.functional.silu, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, hidden_dropout=0.0,
        attention_dropout=0.0, init_method_std=0.05,
    )


def _global_batch() -> torch.Tensor:
    """Four sequences: two micro-batches of two at DP=1, one micro-batch per rank at DP=2."""
    return torch.randint(0, VOCAB, (4, SEQ + 1), generator=torch.Generator().manual_seed(123))


def _run_schedule(model, layout, forward_only: bool):
    """One pass over this DP rank's share of the global batch; returns (global mean loss, logits) on the
    last stage. The loss handed to megatron is normalised by the *global* token count and undoes the
    schedule's division by the micro-batch count and DDP's averaging over DP, so the gradient is the
    single-device gradient of the global mean loss whatever the layout."""
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens_all = _global_batch()
    share = tokens_all.shape[0] // layout.dp
    mine = tokens_all[layout.dp_rank * share:(layout.dp_rank + 1) * share]
    micro = list(mine.split(2))
    global_tokens = tokens_all[:, 1:].numel()
    pos = torch.arange(SEQ).expand(2, SEQ)

    def forward_step(it, chunk):
        tokens = next(it)
        out = chunk(tokens[:, :-1], pos, attention_mask=None)

        def loss_func(logits):
            labels = tokens[:, 1:]
            per_tok = tensor_parallel.vocab_parallel_cross_entropy(logits.float().transpose(0, 1).contiguous(),
                                                                   labels.transpose(0, 1).contiguous())
            loss = per_tok.sum() / global_tokens * len(micro) * layout.dp
            full = tensor_parallel.gather_from_tensor_model_parallel_region(logits.detach())
            return loss, {"loss_sum": per_tok.sum().detach(), "logits": full}

        return out, loss_func

    results = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro), model=model, num_microbatches=len(micro),
        seq_length=SEQ, micro_batch_size=2, forward_only=forward_only)
    if not layout.is_last_stage:
        return None
    loss_sum = torch.stack([r["loss_sum"] for r in results]).sum().reshape(1)
    torch.distributed.all_reduce(loss_sum, group=layout.dp_group)
    return loss_sum / global_tokens, torch.cat([r["logits"] for r in results])


def _worker(rank: int, world: int, tp: int, pp: int, ckpt: str, mode: str, out_dir: str):
    from megatron.core import dist_checkpointing

    from megacov.config.schema import OptimConfig, ParallelConfig
    from megacov.models.core import build_gpt_model
    from megacov.parallel.layout import ParallelLayout
    from megacov.parallel.optim import build_actor_optim

    layout = ParallelLayout.initialize(tp, pp, seed=7)
    try:
        model = build_gpt_model(_tf_config(tp, pp), layout, vocab_size=VOCAB, max_sequence_length=64)
        if mode == "save":
            dist_checkpointing.save(model.sharded_state_dict(), ckpt)
            return None
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt))
        if mode == "forward":
            return _run_schedule([model], layout, forward_only=True)
        # mode == "step": one optimiser step, then save the result for comparison at TP=1
        optim = build_actor_optim([model], layout, OptimConfig(lr=1e-3, clip_grad=0.0), ParallelConfig(),
                                  total_steps=1)
        optim.zero_grad()
        result = _run_schedule(optim.model, layout, forward_only=False)
        applied, _ = optim.step()
        assert applied
        dist_checkpointing.save(model.sharded_state_dict(), out_dir)
        return result
    finally:
        layout.destroy()


def _load_tp1_state(rank: int, world: int, ckpt: str):
    from megatron.core import dist_checkpointing

    from megacov.models.core import build_gpt_model
    from megacov.parallel.layout import ParallelLayout

    layout = ParallelLayout.initialize(1, 1, seed=0)
    try:
        model = build_gpt_model(_tf_config(1, 1), layout, vocab_size=VOCAB, max_sequence_length=64)
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt))
        return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    finally:
        layout.destroy()


def _last_stage_result(results):
    return next(r for r in results if r is not None)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("mcore") / "tp1")
    os.makedirs(ckpt)
    run_distributed(_worker, 1, 1, 1, ckpt, "save", "", timeout_s=300)
    return ckpt


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_resharded_checkpoint_gives_same_logits_and_loss(base_checkpoint, tp, pp):
    ref_loss, ref_logits = _last_stage_result(run_distributed(_worker, 1, 1, 1, base_checkpoint, "forward", ""))
    loss, logits = _last_stage_result(run_distributed(_worker, tp * pp, tp, pp, base_checkpoint, "forward", ""))
    assert logits.shape == ref_logits.shape
    assert (logits - ref_logits).abs().max().item() <= 1e-5
    assert abs(loss.item() - ref_loss.item()) <= 1e-5


@pytest.fixture(scope="module")
def reference_step(base_checkpoint, tmp_path_factory):
    """TP=1 single-process step: (loss, updated weights, initial weights), shared by every layout."""
    ref_dir = str(tmp_path_factory.mktemp("mcore") / "ref")
    os.makedirs(ref_dir)
    ref_loss, _ = _last_stage_result(run_distributed(_worker, 1, 1, 1, base_checkpoint, "step", ref_dir))
    ref = run_distributed(_load_tp1_state, 1, ref_dir)[0]
    base = run_distributed(_load_tp1_state, 1, base_checkpoint)[0]
    return ref_loss, ref, base


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,dp", [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1)])
def test_one_training_step_is_layout_exact(base_checkpoint, reference_step, tmp_path, tp, pp, dp):
    ref_loss, ref, base = reference_step
    out_dir = str(tmp_path / "out")
    os.makedirs(out_dir)
    res = run_distributed(_worker, tp * pp * dp, tp, pp, base_checkpoint, "step", out_dir)
    loss, _ = _last_stage_result(res)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    got = run_distributed(_load_tp1_state, 1, out_dir)[0]
    assert ref.keys() == got.keys()
    moved = 0
    for name in ref:
        assert torch.allclose(got[name], ref[name], rtol=0, atol=1e-5), name
        moved += int(not torch.equal(ref[name], base[name]))
    assert moved >= len(ref) // 2, "the optimiser step did not change the weights"
