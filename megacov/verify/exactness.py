"""``megacov verify exactness``: one update step under several layouts against a float64 reference.

For each layout (TP x PP x DP) the same tiny megatron GPT, with the same weights, takes one
forward/backward step on the same global mini-batch through :func:`megacov.parallel.actor.train_step`.
The reference is a plain-PyTorch float64 forward of those weights (written out here, independent of
megatron), full-vocab ``log_softmax`` and entropy, and the pure algorithm functions applied to the
whole batch at once. Compared per case: the selected token ids (must be identical), the loss, the
gradient of every parameter shard, and the log-probs / entropies of the forward-only pass.

The output layer is padded beyond the real vocabulary with *non-zero* rows, so any leak of
padded columns into the normaliser or the entropy shows up as an error.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megacov.algorithms import algorithm_hparams
from megacov.algorithms import selection as sel
from megacov.algorithms.losses import LossNormalizer
from megacov.algorithms.objective import actor_loss
from megacov.parallel.batch import ActorBatch
from megacov.parallel.vocab_parallel import next_token_targets, reference_logprob_entropy


@dataclass(frozen=True)
class TinySpec:
    """A tiny megatron GPT (Qwen2-like: RMSNorm, RoPE, GQA, SwiGLU, qkv bias)."""

    num_layers: int = 2
    hidden: int = 64
    heads: int = 4
    groups: int = 2
    head_dim: int = 16
    ffn: int = 96
    vocab: int = 67
    """Real vocabulary size."""
    vocab_multiple: int = 4
    """The output layer is padded to a multiple of this (and of every TP size used)."""
    eps: float = 1e-5
    rope_base: float = 10000.0

    @property
    def padded_vocab(self) -> int:
        return int(math.ceil(self.vocab / self.vocab_multiple) * self.vocab_multiple)


def transformer_config(spec: TinySpec, tp: int, pp: int, dtype: torch.dtype) -> Any:
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=spec.num_layers, hidden_size=spec.hidden, num_attention_heads=spec.heads,
        num_query_groups=spec.groups, kv_channels=spec.head_dim, ffn_hidden_size=spec.ffn,
        use_cpu_initialization=True, normalization="RMSNorm", layernorm_epsilon=spec.eps,
        gated_linear_unit=True, add_bias_linear=False, add_qkv_bias=True,
        activation_func=torch.nn.functional.silu, params_dtype=dtype, pipeline_dtype=dtype,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        hidden_dropout=0.0, attention_dropout=0.0)


def full_weights(spec: TinySpec, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Deterministic weights in megatron's TP=1 names and layouts, rounded to ``dtype``, as float64."""
    g = torch.Generator().manual_seed(seed)
    h, vp = spec.hidden, spec.padded_vocab
    qkv = (spec.heads + 2 * spec.groups) * spec.head_dim

    def normal(*shape: int, std: float = 0.08, mean: float = 0.0) -> torch.Tensor:
        return (mean + std * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).double()

    w = {"embedding.word_embeddings.weight": normal(vp, h, std=1.0)}
    for i in range(spec.num_layers):
        p = f"decoder.layers.{i}."
        w[p + "input_layernorm.weight"] = normal(h, std=0.1, mean=1.0)
        w[p + "self_attention.linear_qkv.weight"] = normal(qkv, h, std=0.15)
        w[p + "self_attention.linear_qkv.bias"] = normal(qkv, std=0.05)
        w[p + "self_attention.linear_proj.weight"] = normal(h, spec.heads * spec.head_dim)
        w[p + "pre_mlp_layernorm.weight"] = normal(h, std=0.1, mean=1.0)
        w[p + "mlp.linear_fc1.weight"] = normal(2 * spec.ffn, h)
        w[p + "mlp.linear_fc2.weight"] = normal(h, spec.ffn)
    w["decoder.final_layernorm.weight"] = normal(h, std=0.1, mean=1.0)
    w["output_layer.weight"] = normal(vp, h, std=0.25)  # padded rows too: a leak would show
    return w


def global_param_name(model: torch.nn.Module, local_name: str) -> str:
    """Local parameter name of a pipeline stage -> its TP=1, PP=1 name (global layer index)."""
    parts = local_name.split(".")
    if local_name.startswith("decoder.layers."):
        layer = model.decoder.layers[int(parts[2])]
        parts[2] = str(layer.layer_number - 1)
    return ".".join(parts)


def shard_of(name: str, full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's slice of a full tensor for ``param`` (megatron's partition_dim; the fused
    gate/up rows of a SwiGLU fc1 are split half by half)."""
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    dim = param.partition_dim
    if name.endswith("mlp.linear_fc1.weight"):
        return torch.cat([h.chunk(tp, dim=dim)[tp_rank] for h in full.chunk(2, dim=dim)], dim=dim)
    return full.chunk(tp, dim=dim)[tp_rank]


def load_full_weights(model: torch.nn.Module, full: dict[str, torch.Tensor], tp_rank: int, tp: int) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            src = shard_of(name, full[global_param_name(model, name)], p, tp_rank, tp)
            if tuple(src.shape) != tuple(p.shape):
                raise ValueError(f"{name}: shard {tuple(src.shape)} does not fit {tuple(p.shape)}")
            p.copy_(src.to(p.dtype))


# ----------------------------------------------------------------------------------------------
# float64 reference
# ----------------------------------------------------------------------------------------------


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, spec: TinySpec) -> torch.Tensor:
    """Rotary embedding over the full head dim (rotate-half form), positions 0..L-1. [B, L, n, d].

    The angle table and its cos/sin are float32, as in megatron (and HF): the one place where the
    model itself is not float64, so the reference copies it rather than counting it as an error.
    """
    d, length = x.shape[-1], x.shape[1]
    inv = 1.0 / (spec.rope_base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.outer(torch.arange(length, dtype=torch.float32), inv)
    ang = torch.cat([ang, ang], dim=-1)[None, :, None, :]
    cos, sin = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def reference_forward(w: dict[str, torch.Tensor], spec: TinySpec, input_ids: torch.Tensor) -> torch.Tensor:
    """Float64 logits [B, L, V_pad] of megatron's GPT with TP=1 weights ``w`` (causal, no dropout)."""
    b, length = input_ids.shape
    per = spec.heads // spec.groups
    x = w["embedding.word_embeddings.weight"][input_ids]
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    for i in range(spec.num_layers):
        p = f"decoder.layers.{i}."
        y = _rms(x, w[p + "input_layernorm.weight"], spec.eps)
        qkv = y @ w[p + "self_attention.linear_qkv.weight"].T + w[p + "self_attention.linear_qkv.bias"]
        qkv = qkv.view(b, length, spec.groups, per + 2, spec.head_dim)
        q = _rope(qkv[:, :, :, :per].reshape(b, length, spec.heads, spec.head_dim), spec)
        k = _rope(qkv[:, :, :, per], spec).repeat_interleave(per, dim=2)
        v = qkv[:, :, :, per + 1].repeat_interleave(per, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(spec.head_dim)
        att = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
        o = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, length, spec.heads * spec.head_dim)
        x = x + o @ w[p + "self_attention.linear_proj.weight"].T
        y = _rms(x, w[p + "pre_mlp_layernorm.weight"], spec.eps)
        gate, up = (y @ w[p + "mlp.linear_fc1.weight"].T).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.linear_fc2.weight"].T
    x = _rms(x, w["decoder.final_layernorm.weight"], spec.eps)
    return x @ w["output_layer.weight"].T


def reference_logprobs(w: dict[str, torch.Tensor], spec: TinySpec, input_ids: torch.Tensor,
                       temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 (log_prob, entropy) [B, L] in the ActorBatch column convention."""
    logits = reference_forward(w, spec, input_ids)
    b, length, v = logits.shape
    lp, ent = reference_logprob_entropy(logits.reshape(b * length, v),
                                        next_token_targets(input_ids).reshape(-1), spec.vocab, temperature)
    zero = torch.zeros(b, 1, dtype=lp.dtype)
    return (torch.cat([zero, lp.view(b, length)[:, :-1]], 1), torch.cat([zero, ent.view(b, length)[:, :-1]], 1))


OLD_NOISE = 0.5
"""Noise of the old log-probs around the current ones (the scopes must disagree on the batch)."""
ADV_DRIFT = 1.0
"""Advantage offset from the first to the last sequence (the shards' means must differ)."""


def make_batch(spec: TinySpec, w: dict[str, torch.Tensor], *, batch_size: int, seq_len: int, seed: int,
               temperature: float, old_noise: float = OLD_NOISE) -> ActorBatch:
    """A right-padded global batch; old log-probs = reference log-probs + noise (so some tokens are
    PPO-clipped, and choosing by old instead of current log-probs picks other tokens), advantages
    = a per-sequence value, a little per-token noise and a drift along the batch (so the DP shards'
    own means differ from the batch's: rank-local centring picks other tokens)."""
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, spec.vocab, (batch_size, seq_len), generator=g)
    mask = torch.zeros(batch_size, seq_len)
    for r in range(batch_size):
        prompt = int(torch.randint(2, max(3, seq_len // 3), (1,), generator=g))
        resp = int(torch.randint(2, seq_len - prompt + 1, (1,), generator=g))
        mask[r, prompt:prompt + resp] = 1
        ids[r, prompt + resp:] = 0
    lp, _ = reference_logprobs(w, spec, ids, temperature)
    old = (lp + old_noise * torch.randn(lp.shape, generator=g, dtype=torch.float64)) * mask
    drift = torch.linspace(-ADV_DRIFT, ADV_DRIFT, batch_size).unsqueeze(1)
    adv = (torch.randn(batch_size, 1, generator=g) + drift + 0.1 * torch.randn(batch_size, seq_len, generator=g)) * mask
    return ActorBatch(input_ids=ids, position_ids=torch.arange(seq_len).expand(batch_size, seq_len).clone(),
                      response_mask=mask, old_log_prob=old.float(), advantages=adv.float(),
                      global_seq_ids=torch.arange(batch_size), seq_len=seq_len)


def _scope_selection(hp: Any, lp: torch.Tensor, batch: ActorBatch, step: int) -> tuple[Any, Any]:
    """Whole-batch selection of ``cov_scope=global_old``: the loss's rule scored on the old log-probs."""
    from megacov.algorithms.losses import loss_selection

    m, old = batch.mask, batch.old_log_prob.double()
    stats = sel.scope_stats(old, batch.advantages, m)
    rule = loss_selection(hp.policy_loss)
    if rule is None:
        return None, stats
    inp = sel.SelectionInputs(old, old, batch.advantages, m, batch.global_token_ids, stats, hp=hp, step=step)
    return sel.select_in_scope(sel.get_selection_rule(rule), inp), stats


def reference_step(w: dict[str, torch.Tensor], spec: TinySpec, batch: ActorBatch, hp: Any, *, step: int,
                   temperature: float, dp: int, micro_batches: int) -> dict[str, Any]:
    """Float64 loss, gradients and selected ids of one mini-batch, whole-batch scope (or, for
    ``cov_scope=micro_batch``, each DP shard's micro-batches separately, as the reference code)."""
    params = {k: v.clone().requires_grad_() for k, v in w.items()}
    lp, ent = reference_logprobs(params, spec, batch.input_ids, temperature)
    norm = LossNormalizer.from_mask(batch.mask, batch.seq_len)
    old, adv, m, ids = batch.old_log_prob.double(), batch.advantages.double(), batch.mask, batch.global_token_ids
    if hp.cov_scope == "micro_batch":
        loss, chosen, he_chosen = lp.new_zeros(()), torch.zeros_like(m), torch.zeros_like(m)
        for r in range(dp):
            shard = batch.shard(r, dp)
            lo = int(_row_offset(batch, r, dp))
            for mb in shard.micro_batches(micro_batch_size(shard.batch_size, micro_batches)):
                sl = slice(lo, lo + mb.batch_size)
                lo += mb.batch_size
                part, met = actor_loss(lp[sl], old[sl], adv[sl], m[sl], hp=hp, norm=norm, entropy=ent[sl],
                                       global_ids=ids[sl], step=step)
                loss = loss + part
                if "selected" in met:
                    chosen[sl] = met["selected"]
                if "he_selected" in met:
                    he_chosen[sl] = met["he_selected"]
    else:
        selected, stats = _scope_selection(hp, lp, batch, step) if hp.cov_scope == "global_old" else (None, None)
        loss, met = actor_loss(lp, old, adv, m, hp=hp, norm=norm, selected=selected, entropy=ent,
                               global_ids=ids, stats=stats, step=step)
        chosen = met.get("selected", torch.zeros_like(m))
        he_chosen = met.get("he_selected", torch.zeros_like(m))
    loss.backward()
    # The policy loss is -mean(A * ratio): when the advantages nearly cancel, mean |A| is its scale.
    scale = float(adv.abs()[m.bool()].mean()) if bool(m.any()) else 1.0
    return {"loss": float(loss.detach()), "loss_scale": scale, "grads": {k: p.grad.detach() for k, p in params.items()},
            "selected_ids": sorted(int(i) for i in ids[chosen.bool()].tolist()),
            "he_selected_ids": sorted(int(i) for i in ids[he_chosen.bool()].tolist()),
            "log_prob": lp.detach(), "entropy": ent.detach()}


def _row_offset(batch: ActorBatch, r: int, dp: int) -> int:
    return sum(batch.shard(i, dp).batch_size for i in range(r))


def micro_batch_size(rows: int, count: int) -> int:
    """Sequences per micro-batch so that ``rows`` split into ``count`` micro-batches (or fewer)."""
    return max(1, -(-rows // count))


# ----------------------------------------------------------------------------------------------
# the layout run (one spawned world per layout)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    loss: str
    micro_batches: int
    scope: str = "global"
    entropy_top: float | None = None
    """``algorithm.entropy_top_ratio`` of the case (None: no high-entropy token selection)."""

    def label(self) -> str:
        he = f"+he{self.entropy_top:g}" if self.entropy_top is not None else ""
        return f"{self.loss}{he}/{self.scope}/mb{self.micro_batches}"


TEST_HPARAMS = {"clip_cov_ratio": 0.1, "clip_cov_lb": 0.05, "clip_cov_ub": 5.0, "kl_cov_ratio": 0.1,
                "kl_cov_coef": 1.0, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28}
"""Small ratios and a low Clip-Cov bound so that a tiny batch has several eligible tokens."""


def case_hparams(case: Case, step_seed: int = 0) -> Any:
    # GSPO's published clip range (4e-4) would clip nothing measurable on one step of a tiny
    # model; PPO's range exercises the clipped branch of its gradient too.
    return algorithm_hparams(policy_loss=case.loss, cov_scope=case.scope, seed=step_seed,
                             entropy_top_ratio=case.entropy_top, gspo_clip_ratio_low=0.2,
                             gspo_clip_ratio_high=0.28, **TEST_HPARAMS)


def case_rules(case: Case) -> list[str]:
    """The selection rules a case exercises."""
    from megacov.parallel.selection import step_rules

    return step_rules(case_hparams(case))


# ----------------------------------------------------------------------------------------------
# teeth: the batch must tell the scopes apart, or a broken pre-pass / centring would pass unseen
# ----------------------------------------------------------------------------------------------


def reference_choice(rule: str, hp: Any, batch: ActorBatch, lp: torch.Tensor, ent: torch.Tensor, step: int, *,
                     scope: str = "global", dp: int = 1, micro_batches: int = 1,
                     rank_centring: bool = False) -> list[int]:
    """The global ids ``rule`` picks on ``batch`` (float64 ``lp`` / ``ent`` of the current policy):
    over the whole batch (``global``), scored on the old log-probs (``global_old``), per DP shard
    and micro-batch (``micro_batch``), or -- ``rank_centring`` -- globally but with every DP shard
    centring the covariance on its own means (a broken all-reduce)."""
    spec = sel.get_selection_rule(rule)
    m, ids, adv, old = batch.mask, batch.global_token_ids, batch.advantages.double(), batch.old_log_prob.double()
    if scope == "global_old":
        lp = old

    def inputs(rows: slice, stats: sel.ScopeStats) -> sel.SelectionInputs:
        return sel.SelectionInputs(lp[rows], old[rows], adv[rows], m[rows], ids[rows], stats, hp=hp, step=step,
                                   entropy=ent[rows])

    shards = [slice(_row_offset(batch, r, dp), _row_offset(batch, r, dp) + batch.shard(r, dp).batch_size)
              for r in range(dp)]
    if scope == "micro_batch":
        out: list[int] = []
        for sh in shards:
            size = micro_batch_size(sh.stop - sh.start, micro_batches)
            for lo in range(sh.start, sh.stop, size):
                rows = slice(lo, min(lo + size, sh.stop))
                chosen = sel.select_in_scope(spec, inputs(rows, sel.scope_stats(lp[rows], adv[rows], m[rows])))
                out += ids[rows][chosen].tolist()
        return sorted(out)
    whole = sel.scope_stats(lp, adv, m)
    n = spec.count(whole.n_valid, hp)
    got_ids, got_scores = [], []
    for rows in (shards if rank_centring else [slice(None)]):
        local = sel.scope_stats(lp[rows], adv[rows], m[rows])
        stats = sel.ScopeStats(whole.n_valid, local.mean_logp, local.mean_adv) if rank_centring else whole
        _, i, sc, _ = sel.rule_candidates(spec, inputs(rows, stats), n)
        got_ids.append(i)
        got_scores.append(sc)
    all_ids, scores = torch.cat(got_ids), torch.cat(got_scores)
    pick = (sel.select_largest if spec.largest else sel.select_smallest)(
        scores, torch.ones_like(all_ids, dtype=torch.bool), all_ids, n)
    return sorted(all_ids[pick].tolist())


def teeth_problems(w: dict[str, torch.Tensor], spec: TinySpec, batch: ActorBatch, cases: Sequence[Case], *,
                   step: int, temperature: float) -> list[str]:
    """Why ``batch`` could not catch a broken scope, one line per weakness (empty: it can).

    For every rule the cases exercise, the whole-batch choice must differ from the choice per
    micro-batch (3 per rank) and per DP shard (2 ranks); for covariance rules also from the choice
    on old log-probs and from the choice with rank-local centring (2 ranks).
    """
    lp, ent = reference_logprobs(w, spec, batch.input_ids, temperature)
    problems, seen = [], set()
    for case in cases:
        hp = case_hparams(dataclasses.replace(case, scope="global"))
        for rule in case_rules(case):
            key = (rule, case.loss if rule != "high_entropy" else "", case.entropy_top)
            if key in seen:
                continue
            seen.add(key)
            want = reference_choice(rule, hp, batch, lp, ent, step)
            others = {"micro_batch (3 per rank)": dict(scope="micro_batch", micro_batches=3),
                      "micro_batch (2 ranks)": dict(scope="micro_batch", dp=2)}
            if sel.get_selection_rule(rule).uses_covariance:
                others["global_old"] = dict(scope="global_old")
                others["rank-local centring (2 ranks)"] = dict(rank_centring=True, dp=2)
            for what, kw in others.items():
                if reference_choice(rule, hp, batch, lp, ent, step, **kw) == want:
                    problems.append(f"vocab {spec.vocab}, {rule} ({case.label()}): the whole-batch choice equals "
                                    f"the {what} choice, so a layout that used it would pass")
    return problems


def _mutate_old_log_probs() -> None:
    """Broken on purpose: ``cov_scope=global`` scores on the old log-probs (no pre-pass)."""
    import megacov.parallel.actor as actor

    original = actor.prepare_selection

    def broken(*args: Any, **kwargs: Any) -> Any:
        kwargs["current_log_prob"] = args[2].old_log_prob
        return original(*args, **kwargs)

    actor.prepare_selection = broken


def _mutate_rank_centring() -> None:
    """Broken on purpose: each DP rank centres the covariance on its own means."""
    import megacov.parallel.actor as actor

    original = actor.global_scope_stats

    def broken(log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, group: Any) -> Any:
        whole = original(log_prob, advantages, mask, group)
        local = sel.scope_stats(log_prob.double(), advantages.double(), mask)
        return sel.ScopeStats(whole.n_valid, local.mean_logp, local.mean_adv)

    actor.global_scope_stats = broken


def _mutate_micro_batch_quantile() -> None:
    """Broken on purpose: the high-entropy tokens are chosen per micro-batch."""
    import megacov.parallel.actor as actor

    original = actor.step_rules
    actor.step_rules = lambda hp: [r for r in original(hp) if r != "high_entropy"]


MUTATIONS = {"old_log_probs_in_global": _mutate_old_log_probs, "rank_local_centring": _mutate_rank_centring,
             "micro_batch_quantile": _mutate_micro_batch_quantile}
"""Deliberately broken variants (``--mutate``): each must make the check fail, which shows the
check can see that kind of error on this batch."""


@dataclass(frozen=True)
class RunOptions:
    seed: int = 0
    dtype_name: str = "float32"
    temperature: float = 0.9
    step: int = 3
    ddp: bool = False
    """Wrap the model in megatron's DistributedDataParallel (as training does) and compare the
    finalised ``main_grad`` instead of the raw ``.grad`` summed over DP by ``train_step``."""
    mutation: str | None = None
    """Name in :data:`MUTATIONS` applied in every rank before the cases (None: the real code)."""
    max_tokens: int | None = None
    """Token-budget micro-batches and token-balanced DP shares (``parallel.max_tokens_per_micro_batch``)
    instead of the case's micro-batch count and contiguous shares."""
    pack: bool = False
    """Run every micro-batch packed into one row (``parallel.pack_sequences``)."""


def _build(spec: TinySpec, layout: Any, opts: RunOptions, seq_len: int, w: dict) -> tuple[Any, Any]:
    """(module holding the parameters, what train_step gets) for this rank."""
    from megacov.models.core import build_gpt_model

    dtype = getattr(torch, opts.dtype_name)
    model = build_gpt_model(transformer_config(spec, layout.tp, layout.pp, dtype), layout,
                            vocab_size=spec.padded_vocab, max_sequence_length=seq_len).to(dtype)
    load_full_weights(model, w, layout.tp_rank, layout.tp)
    if not opts.ddp:
        return model, model
    from megacov.config.schema import ParallelConfig
    from megacov.parallel.optim import wrap_ddp

    return model, wrap_ddp([model], layout, ParallelConfig(use_distributed_optimizer=False))[0]


def _grads(model: torch.nn.Module, chunk: Any, layout: Any, opts: RunOptions) -> dict[str, torch.Tensor]:
    if opts.ddp:
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads([chunk], pg_collection=layout.pg_collection)
        return {global_param_name(model, n): p.main_grad.detach().double().clone()
                for n, p in model.named_parameters()}
    return {global_param_name(model, n): p.grad.detach().double().clone()
            for n, p in model.named_parameters() if p.grad is not None}


def layout_worker(rank: int, world: int, tp: int, pp: int, specs: Sequence[TinySpec], cases: Sequence[Case],
                  batches: Sequence[ActorBatch], weights: Sequence[dict], opts: RunOptions) -> list[dict[str, Any]]:
    """Runs in each spawned process: every (spec, case) on this layout; returns per-case results."""
    from megacov.parallel.actor import compute_log_probs, prepare_selection, train_step
    from megacov.parallel.layout import ParallelLayout

    if opts.mutation is not None:
        MUTATIONS[opts.mutation]()
    layout = ParallelLayout.initialize(tp, pp, seed=opts.seed)
    results = []
    try:
        for spec, batch, w in zip(specs, batches, weights):
            model, chunk = _build(spec, layout, opts, batch.seq_len, w)
            shard = (batch.shard(layout.dp_rank, layout.dp) if opts.max_tokens is None
                     else batch.balanced_shard(layout.dp_rank, layout.dp))
            lp, ent = compute_log_probs([chunk], layout, shard, temperature=opts.temperature, chunk_size=7,
                                        real_vocab_size=spec.vocab, micro_batch_size=2,
                                        max_tokens_per_micro_batch=opts.max_tokens, pack=opts.pack)
            partition = {global_param_name(model, n): (p.partition_dim if getattr(p, "tensor_model_parallel", False)
                                                       else None) for n, p in model.named_parameters()}
            for case in cases:
                kw = {"step": opts.step, "temperature": opts.temperature, "real_vocab_size": spec.vocab,
                      "micro_batch_size": micro_batch_size(shard.batch_size, case.micro_batches),
                      "max_tokens_per_micro_batch": opts.max_tokens}
                metrics = train_step([chunk], layout, shard, algo_cfg=case_hparams(case), chunk_size=5,
                                     pack=opts.pack, **kw)
                # the same choice when the caller supplies current log-probs instead of the pre-pass
                reused = prepare_selection([chunk], layout, shard, algo_cfg=case_hparams(case), chunk_size=5,
                                           current_log_prob=lp, current_entropy=ent, **kw)
                if reused is not None:
                    for rule, choice in reused.by_rule.items():
                        key = "he_selected_ids" if rule == "high_entropy" else "selected_ids"
                        metrics[f"reused_{key}"] = choice.selected_ids.tolist()
                results.append({"spec": spec, "case": case, "metrics": metrics,
                                "grads": _grads(model, chunk, layout, opts), "tp_rank": layout.tp_rank,
                                "dp_rank": layout.dp_rank, "log_prob": lp.double(), "entropy": ent.double(),
                                "rows": shard.global_seq_ids.tolist(),
                                "params": partition})
    finally:
        layout.destroy()
    return results


@dataclass
class Row:
    """One compared case. ``loss_rel`` is |dloss| / max(|loss|, mean |A|) (the loss of zero-mean
    advantages can nearly cancel); ``grad_rel`` is max |dg| / max |g_ref| over every parameter."""

    layout: str
    vocab: int
    case: str
    selected_equal: bool
    n_selected: int
    loss_rel: float
    grad_rel: float
    logp_abs: float
    entropy_abs: float
    he_equal: bool = True
    """The high-entropy tokens equal the reference's (True when the case selects none)."""
    n_he: int = 0

    def failed_checks(self, tol: Tolerances) -> list[str]:
        """The checks this row fails: selected ids, high-entropy ids, loss, grads, log-probs."""
        out = []
        if not self.selected_equal:
            out.append("selected")
        if not self.he_equal:
            out.append("he_selected")
        if not self.loss_rel <= tol.loss:
            out.append("loss")
        if not self.grad_rel <= tol.grad:
            out.append("grad")
        if not (self.logp_abs <= tol.logp and self.entropy_abs <= tol.logp):
            out.append("logp")
        return out

    def ok(self, tol: Tolerances) -> bool:
        return not self.failed_checks(tol)


@dataclass(frozen=True)
class Tolerances:
    loss: float = 1e-6
    grad: float = 1e-5
    logp: float = 1e-5

    @classmethod
    def for_dtype(cls, dtype_name: str) -> Tolerances:
        return cls(loss=1e-10, grad=1e-9, logp=1e-10) if dtype_name == "float64" else cls()


def parse_layout(text: str) -> tuple[int, int, int]:
    """'TPxPPxDP' -> (tp, pp, dp)."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"layout '{text}' is not TPxPPxDP with positive integers (e.g. 2x1x2)")
    tp, pp, dp = (int(p) for p in parts)
    return tp, pp, dp


def compare(results: list[list[dict[str, Any]]], refs: dict[tuple, dict[str, Any]], label: str, tp: int,
            dp: int) -> list[Row]:
    """Rows of one layout: every rank's grad shard against the matching slice of the reference."""
    rows = []
    for i, first in enumerate(results[0]):
        spec, case = first["spec"], first["case"]
        ref = refs[(spec, case)]
        grad_rel, logp_abs, ent_abs = 0.0, 0.0, 0.0
        for rank_results in results:
            res = rank_results[i]
            grad_rel = max(grad_rel, _grad_error(res, ref["grads"], tp))
            shard_rows = res["rows"]  # global sequence id = row of the reference batch
            logp_abs = max(logp_abs, _masked_max(res["log_prob"] - ref["log_prob"][shard_rows], ref["mask"][shard_rows]))
            ent_abs = max(ent_abs, _masked_max(res["entropy"] - ref["entropy"][shard_rows], ref["mask"][shard_rows]))
        same = _ids_equal(results, i, ref, "selected_ids")
        he_same = _ids_equal(results, i, ref, "he_selected_ids")
        loss = first["metrics"]["pg_loss" if "total_loss" not in first["metrics"] else "total_loss"]
        rows.append(Row(layout=label, vocab=spec.vocab, case=case.label(), selected_equal=same,
                        n_selected=len(ref["selected_ids"]), he_equal=he_same, n_he=len(ref["he_selected_ids"]),
                        loss_rel=abs(loss - ref["loss"]) / max(abs(ref["loss"]), ref["loss_scale"], 1e-30),
                        grad_rel=grad_rel, logp_abs=logp_abs, entropy_abs=ent_abs))
    return rows


def _ids_equal(results: list[list[dict[str, Any]]], i: int, ref: dict[str, Any], key: str) -> bool:
    """Every rank's choice (from the pre-pass and from supplied current log-probs) is the
    reference's; a rank that reports no such choice reports an empty one."""
    got = [r[i]["metrics"].get(key, []) for r in results]
    got += [r[i]["metrics"][f"reused_{key}"] for r in results if f"reused_{key}" in r[i]["metrics"]]
    return all(list(x) == ref[key] for x in got)


def _masked_max(diff: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.bool()
    return float(diff.abs()[m].max()) if bool(m.any()) else 0.0


def _grad_error(res: dict[str, Any], ref_grads: dict[str, torch.Tensor], tp: int) -> float:
    """max over this rank's parameters of max|g - g_ref| / max|g_ref (whole tensor)|."""
    worst = 0.0
    for name, g in res["grads"].items():
        full = ref_grads[name]
        dim = res["params"][name]
        if dim is not None and tp > 1:
            fake = torch.empty(0)
            fake.tensor_model_parallel, fake.partition_dim = True, dim  # type: ignore[attr-defined]
            want = shard_of(name, full, fake, res["tp_rank"], tp)
        else:
            want = full
        scale = float(full.abs().max())
        worst = max(worst, float((g - want).abs().max()) / max(scale, 1e-30))
    return worst


class WeakBatchError(ValueError):
    """The test batch cannot tell a scope from another: the comparison would prove nothing."""


def run_exactness(layouts: Sequence[str], micro_batches: Sequence[int], losses: Sequence[str],
                  vocab_sizes: Sequence[int], *, opts: RunOptions = RunOptions(),
                  scopes: Sequence[str] = ("global",), extra_cases: Sequence[Case] = (),
                  entropy_top: float | None = None, batch_size: int = 7, seq_len: int = 32,
                  timeout_s: float = 600.0) -> list[Row]:
    """Every layout x vocab size x (loss x micro-batch count x scope, with and -- ``entropy_top``
    set -- without the high-entropy tokens, plus ``extra_cases``); one spawned world per layout
    runs all of them. The odd default batch size gives DP ranks unequal shares and pipelines a
    padded last micro-batch.

    Before any layout runs, the batch must tell the scopes apart for every rule the cases
    exercise (:func:`teeth_problems`); otherwise :class:`WeakBatchError` is raised.
    """
    from megacov.parallel.spawn import run_distributed

    if opts.max_tokens is not None and "micro_batch" in scopes:
        raise ValueError("token-budget micro-batches need cov_scope global / global_old: the micro_batch "
                         "scope's choice depends on the cut, which its reference does not follow")
    specs = [TinySpec(vocab=v) for v in vocab_sizes]
    cases = [Case(loss=lo, micro_batches=m, scope=s) for lo in losses for m in micro_batches for s in scopes]
    if entropy_top is not None:
        cases += [Case(loss=lo, micro_batches=m, scope=s, entropy_top=entropy_top) for lo in losses
                  for m in micro_batches for s in scopes if s != "global_old"]
    cases += [c for c in extra_cases if c not in cases]
    dtype = getattr(torch, opts.dtype_name)
    weights = [full_weights(spec, opts.seed, dtype) for spec in specs]
    batches = [make_batch(spec, w, batch_size=batch_size, seq_len=seq_len, seed=opts.seed,
                          temperature=opts.temperature) for spec, w in zip(specs, weights)]
    batches = [dataclasses.replace(b, old_log_prob=b.old_log_prob.to(dtype), advantages=b.advantages.to(dtype))
               for b in batches]
    weak = [p for spec, w, batch in zip(specs, weights, batches)
            for p in teeth_problems(w, spec, batch, cases, step=opts.step, temperature=opts.temperature)]
    if weak:
        raise WeakBatchError("\n".join(weak))
    rows: list[Row] = []
    for text in layouts:
        tp, pp, dp = parse_layout(text)
        refs = {}
        for spec, w, batch in zip(specs, weights, batches):
            for case in cases:
                ref = reference_step(w, spec, batch, case_hparams(case), step=opts.step,
                                     temperature=opts.temperature, dp=dp, micro_batches=case.micro_batches)
                ref["mask"] = batch.mask
                refs[(spec, case)] = ref
        results = run_distributed(layout_worker, tp * pp * dp, tp, pp, specs, cases, batches, weights, opts,
                                  timeout_s=timeout_s)
        rows.extend(compare(results, refs, text, tp, dp))
    return rows


def format_table(rows: Sequence[Row], tol: Tolerances) -> str:
    head = (f"{'layout':<8} {'vocab':>5} {'case':<30} {'sel==':>5} {'n_sel':>5} {'he==':>5} {'n_he':>4} "
            f"{'|dloss|rel':>10} {'dgrad rel':>10} {'|dlogp|':>10} {'|dH|':>10} ok")
    lines = [head, "-" * len(head)]
    for r in rows:
        failed = r.failed_checks(tol)
        lines.append(f"{r.layout:<8} {r.vocab:>5} {r.case:<30} {r.selected_equal!s:>5} {r.n_selected:>5} "
                     f"{r.he_equal!s:>5} {r.n_he:>4} "
                     f"{r.loss_rel:>10.2e} {r.grad_rel:>10.2e} {r.logp_abs:>10.2e} {r.entropy_abs:>10.2e} "
                     f"{'yes' if not failed else 'NO (' + ', '.join(failed) + ')'}")
    return "\n".join(lines)


def parse_list(text: str, kind: type = str) -> list[Any]:
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


def main(layouts: Sequence[str], micro_batches: Sequence[int], losses: Sequence[str], vocab_sizes: Sequence[int],
         *, seed: int, dtype_name: str, scopes: Sequence[str], ddp: bool = False,
         entropy_top: float | None = None, mutation: str | None = None, out: Any | None = None,
         max_tokens: int | None = None, pack: bool = False) -> int:
    """Run, print the table, return 0 when every row matches (1 otherwise, or when the batch
    cannot tell the scopes apart)."""
    import sys

    stream = out or sys.stdout
    tol = Tolerances.for_dtype(dtype_name)
    try:
        rows = run_exactness(layouts, micro_batches, losses, vocab_sizes, scopes=scopes, entropy_top=entropy_top,
                             opts=RunOptions(seed=seed, dtype_name=dtype_name, ddp=ddp, mutation=mutation,
                                             max_tokens=max_tokens, pack=pack))
    except WeakBatchError as exc:
        print(f"the test batch is too weak to check anything:\n{exc}", file=sys.stderr)
        return 1
    print(format_table(rows, tol), file=stream)
    bad = [r for r in rows if not r.ok(tol)]
    print(f"{len(rows) - len(bad)}/{len(rows)} cases match the float64 reference "
          f"(tolerances: loss {tol.loss:g} rel, grad {tol.grad:g} rel, logp/entropy {tol.logp:g} abs)",
          file=stream)
    return 0 if not bad else 1


# ----------------------------------------------------------------------------------------------
# command line: megacov verify exactness
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: Any) -> None:
    parser.add_argument("--layouts", default="1x1x1,2x1x1,1x2x1,2x2x1,1x1x2",
                        help="comma-separated TPxPPxDP layouts, one spawned gloo world each")
    parser.add_argument("--micro-batches", default="1,4", help="micro-batches per DP rank, comma-separated")
    parser.add_argument("--loss", default=None, help="policy losses, comma-separated (default: every registered one)")
    parser.add_argument("--entropy-top-ratio", type=float, default=0.2,
                        help="also run every loss with the high-entropy tokens of this ratio (0 disables)")
    parser.add_argument("--vocab-size", default="67,64",
                        help="real vocabulary sizes, comma-separated (67 needs padding at any TP > 1)")
    parser.add_argument("--scopes", default="global", help="algorithm.cov_scope values, comma-separated")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                        help="parameter dtype of the megatron model (float64: agreement to ~1e-14)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ddp", action="store_true",
                        help="wrap the model in megatron DistributedDataParallel, as training does")
    parser.add_argument("--mutate", default=None, choices=sorted(MUTATIONS),
                        help="break one component on purpose; the check must then fail (shows it has teeth)")
    parser.add_argument("--max-tokens-per-micro-batch", type=int, default=None,
                        help="cut micro-batches by this token budget and balance DP shares by tokens "
                             "(cov_scope global / global_old only: micro_batch scope depends on the cut)")
    parser.add_argument("--pack", action="store_true",
                        help="run every micro-batch packed into one row (block-diagonal causal mask)")


def run(args: Any) -> int:
    from megacov.algorithms import list_policy_losses
    from megacov.cli._common import fail
    from megacov.parallel.actor import COV_SCOPES

    try:
        layouts = parse_list(args.layouts)
        for text in layouts:
            parse_layout(text)
        micro = parse_list(args.micro_batches, int)
        vocab = parse_list(args.vocab_size, int)
    except ValueError as exc:
        return fail(str(exc), 2)
    losses = parse_list(args.loss) if args.loss is not None else list_policy_losses()
    scopes = parse_list(args.scopes)
    unknown = [x for x in losses if x not in list_policy_losses()]
    if unknown:
        return fail(f"unknown --loss {', '.join(unknown)} (choose from {', '.join(list_policy_losses())})", 2)
    bad_scope = [x for x in scopes if x not in COV_SCOPES]
    if bad_scope:
        return fail(f"unknown --scopes {', '.join(bad_scope)} (choose from {', '.join(COV_SCOPES)})", 2)
    if not layouts or not micro or not vocab or min(micro) < 1 or min(vocab) < 2:
        return fail("--layouts, --micro-batches and --vocab-size need at least one value; micro-batches "
                    ">= 1 and vocab sizes >= 2", 2)
    if args.ddp and args.dtype != "float32":
        return fail("--ddp reduces gradients in float32; use it with --dtype float32", 2)
    if not 0 <= args.entropy_top_ratio <= 1:
        return fail(f"--entropy-top-ratio {args.entropy_top_ratio} must be in [0, 1]", 2)
    max_tokens = args.max_tokens_per_micro_batch
    if max_tokens is not None and (max_tokens < 1 or "micro_batch" in scopes):
        return fail("--max-tokens-per-micro-batch must be >= 1 and needs --scopes global / global_old", 2)
    return main(layouts, micro, losses, vocab, seed=args.seed, dtype_name=args.dtype, scopes=scopes, ddp=args.ddp,
                entropy_top=args.entropy_top_ratio or None, mutation=args.mutate, max_tokens=max_tokens,
                pack=args.pack)
