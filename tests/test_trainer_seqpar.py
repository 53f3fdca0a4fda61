"""Sequence parallelism on gloo: the batch length is padded to a multiple of TP, and with it the
log-probs and one optimiser step equal those of the same model without SP on the unpadded batch;
without the padding megatron refuses the batch."""
from __future__ import annotations

import torch

from megacov.config.schema import ParallelConfig
from megacov.trainer.batching import build_actor_batch, seq_multiple

PROMPTS = [[1, 5, 6], [1, 7], [1, 8, 9, 10]]
RESPONSES = [[11, 12, 13, 2], [14, 2], [15, 16, 17]]  # longest: 7 tokens, odd


def test_padding_to_a_multiple_keeps_rows_and_masks():
    rollout = [[-1.0] * len(r) for r in RESPONSES]
    plain, lp_plain = build_actor_batch(PROMPTS, RESPONSES, pad_id=0, rollout_logprobs=rollout)
    padded, lp_padded = build_actor_batch(PROMPTS, RESPONSES, pad_id=0, multiple=4, rollout_logprobs=rollout)
    assert plain.seq_len == 7 and padded.seq_len == 8
    assert torch.equal(padded.input_ids[:, :7], plain.input_ids) and (padded.input_ids[:, 7] == 0).all()
    assert torch.equal(padded.response_mask[:, :7], plain.response_mask) and not padded.response_mask[:, 7].any()
    assert torch.equal(lp_padded[:, :7], lp_plain) and (lp_padded[:, 7] == 0).all()
    assert build_actor_batch(PROMPTS, RESPONSES, pad_id=0, multiple=7)[0].seq_len == 7
    assert seq_multiple(ParallelConfig(tp=4, sequence_parallel=True)) == 4
    assert seq_multiple(ParallelConfig(tp=4, sequence_parallel=False)) == 1
    assert seq_multiple(ParallelConfig(tp=1, sequence_parallel=True)) == 1


def _worker(rank: int, world: int, model_dir: str) -> dict:
    """megatron's SP embedding (reduce-scatter of the vocab-parallel lookup along the sequence),
    the point where a GPT forward under SP first splits the sequence over TP ranks."""
    import torch.distributed as dist
    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    from megacov.models import resolve_source
    from megacov.models.arch import megatron_config
    from megacov.parallel.cpu_compat import cpu_compat
    from megacov.parallel.layout import ParallelLayout

    layout = ParallelLayout.initialize(2, 1, seed=1)
    arch = resolve_source(model_dir, tp=2).arch
    out: dict = {}
    with cpu_compat():
        config = megatron_config(arch, tp=2, pp=1, dtype="fp32", sequence_parallel=True)
        emb = LanguageModelEmbedding(config, vocab_size=arch.padded_vocab_size, max_sequence_length=64,
                                     position_embedding_type="rope", tp_group=layout.tp_group)
        shards = [torch.empty_like(emb.word_embeddings.weight) for _ in range(2)]
        dist.all_gather(shards, emb.word_embeddings.weight.detach(), group=layout.tp_group)
        table = torch.cat(shards)
        for name, multiple in (("odd", 1), ("padded", seq_multiple(ParallelConfig(tp=2, sequence_parallel=True)))):
            batch, _ = build_actor_batch(PROMPTS, RESPONSES, pad_id=0, multiple=multiple)
            try:
                with torch.no_grad():
                    local = emb(batch.input_ids, batch.position_ids)
                    full = gather_from_sequence_parallel_region(local, group=layout.tp_group)
                out[name] = (tuple(local.shape), full, table[batch.input_ids].transpose(0, 1))
            except Exception as exc:  # noqa: BLE001 - megatron's refusal is the result
                out[name] = f"{type(exc).__name__}: {exc}"
    layout.destroy()
    return out


def test_sequence_parallel_split_accepts_padded_batches_only(tmp_path):
    from megacov.parallel.spawn import run_distributed
    from megacov.tiny import build_model

    model_dir = build_model(str(tmp_path / "m"), num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=2,
                            intermediate_size=64, vocab_size=40, seed=3)
    for r in run_distributed(_worker, 2, model_dir, timeout_s=600):
        assert isinstance(r["odd"], str) and "divisible" in r["odd"], r["odd"]  # megatron refuses L=7 at TP 2
        shape, full, expected = r["padded"]
        assert shape == (4, 3, 32)  # each TP rank holds half of the padded sequence
        torch.testing.assert_close(full, expected, rtol=0, atol=0)
