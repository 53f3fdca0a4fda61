"""Expert parallelism is exact: one training step of a Qwen3-MoE model at EP=2 gives the weights of
EP=1 (within 1e-5, fp32), and Clip-Cov / KL-Cov choose the same tokens at EP in {1, 2} x
micro-batches in {1, 3} as a float64 single-process reference (transformers' model in float64 and
the pure selection functions on the whole batch).

Both layouts run on 2 gloo ranks with DP=2, so the only difference between them is whether the
experts are split over the two ranks (tokens exchanged by megatron's dispatcher, expert gradients
reduced over the expert-data-parallel group) or replicated.
"""
from __future__ import annotations

import math

import pytest
import torch

# The exactness harness's case and hyper-parameter helpers.
from megacov.verify.exactness import Case, case_hparams, micro_batch_size
from megacov.parallel.spawn import run_distributed

TEMPERATURE, STEP, LR = 0.9, 3, 0.5
CASES = [Case(loss, mb) for loss in ("clip_cov", "kl_cov") for mb in (1, 3)]


def _batch(hf_dir: str, batch_size: int = 6, seq_len: int = 16, seed: int = 0):
    """A right-padded global batch with old log-probs = float64 HF log-probs + noise."""
    from transformers import AutoModelForCausalLM

    from megacov.parallel.batch import ActorBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 67, (batch_size, seq_len), generator=g)
    mask = torch.zeros(batch_size, seq_len)
    for r in range(batch_size):
        prompt = int(torch.randint(2, seq_len // 3, (1,), generator=g))
        resp = int(torch.randint(2, seq_len - prompt + 1, (1,), generator=g))
        mask[r, prompt:prompt + resp] = 1
        ids[r, prompt + resp:] = 0
    # eager experts: transformers' grouped-GEMM experts have no float64 kernel
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64, experts_implementation="eager").eval()
    lp, ent = _hf_logprobs(hf, ids)
    old = (lp + 0.15 * torch.randn(lp.shape, generator=g, dtype=torch.float64)) * mask
    adv = (torch.randn(batch_size, 1, generator=g) + 0.1 * torch.randn(batch_size, seq_len, generator=g)) * mask
    batch = ActorBatch(input_ids=ids, position_ids=torch.arange(seq_len).expand(batch_size, seq_len).clone(),
                       response_mask=mask, old_log_prob=old.float(), advantages=adv.float(),
                       global_seq_ids=torch.arange(batch_size), seq_len=seq_len)
    return batch, lp, ent


def _hf_logprobs(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] log-probs / entropies in megacov's convention (column t: token t given its prefix)."""
    from megacov.parallel.vocab_parallel import reference_logprob_entropy

    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    b, length = ids.shape
    lp, ent = reference_logprob_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                        logits.shape[-1], TEMPERATURE)
    zero = torch.zeros(b, 1, dtype=torch.float64)
    return torch.cat([zero, lp.view(b, length - 1)], 1), torch.cat([zero, ent.view(b, length - 1)], 1)


def _reference_selection(batch, lp: torch.Tensor, ent: torch.Tensor, case: Case) -> list[int]:
    from megacov.algorithms.losses import LossNormalizer
    from megacov.algorithms.objective import actor_loss

    norm = LossNormalizer.from_mask(batch.mask, batch.seq_len)
    _, met = actor_loss(lp, batch.old_log_prob.double(), batch.advantages.double(), batch.mask,
                        hp=case_hparams(case), norm=norm, entropy=ent, global_ids=batch.global_token_ids, step=STEP)
    return sorted(int(i) for i in batch.global_token_ids[met["selected"].bool()].tolist())


def _worker(rank: int, world: int, ep: int, hf_dir: str, batch) -> dict:
    from megacov.models import build_model, iter_hf_weights
    from megacov.models.moe_metrics import RouterLoad
    from megacov.parallel.actor import compute_log_probs, train_step
    from megacov.parallel.layout import ParallelLayout

    layout = ParallelLayout.initialize(1, 1, ep=ep, seed=0)
    out: dict = {"cases": {}}
    try:
        model, info = build_model(hf_dir, layout, dtype="fp32")
        shard = batch.shard(layout.dp_rank, layout.dp)
        lp, _ = compute_log_probs([model], layout, shard, temperature=TEMPERATURE, chunk_size=5,
                                  real_vocab_size=info.vocab_size, micro_batch_size=2)
        out["log_prob"] = (layout.dp_rank, lp.double())
        load = RouterLoad(model, info.arch.num_layers, info.arch.moe.num_experts)
        for case in CASES:
            load.reset()
            metrics = train_step([model], layout, shard, algo_cfg=case_hparams(case), step=STEP,
                                 temperature=TEMPERATURE, chunk_size=5, real_vocab_size=info.vocab_size,
                                 micro_batch_size=micro_batch_size(shard.batch_size, case.micro_batches))
            router = load.collect(layout)
            saved = [p.detach().clone() for p in model.parameters()]
            with torch.no_grad():
                for p in model.parameters():
                    p -= LR * p.grad  # one SGD step: the updated weights, gathered to HF names
            updated = {n: t.clone() for n, t in iter_hf_weights(model, layout, info)}
            with torch.no_grad():
                for p, s in zip(model.parameters(), saved):
                    p.copy_(s)
            out["cases"][case] = (metrics["selected_ids"], metrics["pg_loss"], updated, router)
        # the router losses, switched on from the config, are logged per layer
        from megacov.config.schema import ModelConfig
        from megacov.models.moe_metrics import router_overrides

        overrides = router_overrides(ModelConfig(moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001), hf_dir)
        lossy, _ = build_model(hf_dir, layout, dtype="fp32", **overrides)
        load = RouterLoad(lossy, info.arch.num_layers, info.arch.moe.num_experts)
        load.reset()
        train_step([lossy], layout, shard, algo_cfg=case_hparams(CASES[0]), step=STEP, temperature=TEMPERATURE,
                   chunk_size=5, real_vocab_size=info.vocab_size, micro_batch_size=shard.batch_size)
        out["router_losses"] = load.collect(layout)
    finally:
        layout.destroy()
    return out


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> str:
    from megacov.tiny import build_moe_model

    return build_moe_model(str(tmp_path_factory.mktemp("moe_ep") / "m"), num_layers=2, mlp_only_layers=(),
                           vocab_size=67, seed=4)


def test_ep2_step_equals_ep1_and_selection_matches_float64(moe_dir: str) -> None:
    from safetensors.torch import load_file

    batch, ref_lp, ref_ent = _batch(moe_dir)
    runs = {ep: run_distributed(_worker, 2, ep, moe_dir, batch, timeout_s=600) for ep in (1, 2)}
    for ep, ranks in runs.items():  # aux and z-loss switched on from the config are logged per MoE layer
        losses = ranks[0]["router_losses"]
        for name in ("aux_loss", "z_loss"):
            values = [losses.get(f"moe/{name}/layer_{i}", 0.0) for i in range(2)]
            assert all(math.isfinite(v) and v > 0 for v in values), f"ep={ep}: {name} not logged: {losses}"
        assert losses == ranks[1]["router_losses"], "router metrics must be identical on every rank"
    mask = batch.mask.bool()
    initial = load_file(f"{moe_dir}/model.safetensors")
    for ep, ranks in runs.items():
        for r in ranks:  # the forward pass agrees with transformers in float64
            dp_rank, lp = r["log_prob"]
            rows = slice(dp_rank * 3, dp_rank * 3 + 3)
            assert (lp - ref_lp[rows]).abs()[mask[rows]].max() < 1e-5, f"ep={ep}: log-probs"
    for case in CASES:
        expected = _reference_selection(batch, ref_lp, ref_ent, case)
        assert expected, f"{case.label()}: the reference selects no token (the check would be empty)"
        for ep, ranks in runs.items():
            for r in ranks:
                assert r["cases"][case][0] == expected, f"ep={ep} {case.label()}: selected tokens differ"
        one, two = runs[1][0]["cases"][case], runs[2][0]["cases"][case]
        assert abs(one[1] - two[1]) <= 1e-6 * max(1.0, abs(one[1])), f"{case.label()}: loss"
        assert set(one[2]) == set(two[2]) and len(one[2]) > 0
        worst = max((one[2][k] - two[2][k]).abs().max().item() for k in one[2])
        assert worst <= 1e-5, f"{case.label()}: EP=2 weights after one step differ from EP=1 by {worst}"
        # router metrics: identical routing at EP=1 and EP=2, every routed token counted once per pass
        assert one[3] == two[3] and runs[2][1]["cases"][case][3] == two[3], f"{case.label()}: router metrics"
        routed = sum(v for k, v in one[3].items() if k.startswith("moe/tokens_per_expert_mean/")) * 8
        assert routed > 0 and routed % (batch.batch_size * batch.seq_len * 2) == 0, routed
        assert {k.rsplit("/", 1)[1] for k in one[3]} == {"layer_0", "layer_1"}
        # the comparison is not vacuous: the step moved the experts
        moved = max((one[2][k] - initial[k]).abs().max().item() for k in one[2] if ".experts." in k)
        assert moved > 1e-4, f"{case.label()}: the step did not change the expert weights ({moved})"

