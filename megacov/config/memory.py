"""Per-GPU memory plan of a run: what ``megacov train CONFIG --dry-run`` prints, before any allocation.

All arithmetic of the plan is here, from the HF architecture (:class:`megacov.models.arch.Arch`) and
the config; nothing is imported from megatron or vLLM. Symbols: ``h`` hidden size, ``q = heads *
head_dim``, ``kv = kv_heads * head_dim``, ``f`` FFN size, ``V`` vocabulary, ``Vp`` the padded
vocabulary (:func:`megacov.models.arch.padded_vocab`), ``L`` layers, ``t`` / ``p`` / ``d`` actor TP
/ PP / DP, ``B`` bytes per training-dtype element (2 for bf16/fp16, 4 for fp32).

Parameters of one TP rank of one pipeline stage (exactly what megatron allocates, checked against
``sum(p.numel())`` of built models in the tests)::

    layer  = 2h + (q + 2kv) h / t + [qkv bias] (q + 2kv) / t + [qk norm] 2 head_dim
             + q h / t + 3 f h / t
    stage  = (L / p) layer + [first stage] Vp h / t
             + [last stage] h + [last stage, untied or p > 1] Vp h / t

(norms are replicated over TP; megatron keeps its own copy of a tied output layer on the last stage
when ``p > 1``). The plan uses the most loaded stage.

Training state per GPU (megatron DDP reduces gradients in fp32; Adam keeps an fp32 main copy only
when the params are 16-bit; the distributed optimizer shards main params and moments over DP)::

    actor params = P B          grads = 4 P          reference = P B   (forward-only, same layout)
    optimizer    = (12 if B == 2 else 8) P / (d if distributed optimizer else 1)

Activations of one micro-batch of ``T = micro_batch_size * (max_prompt_len + max_response_len)``
tokens (bf16 tensors saved for backward; flash attention keeps no ``s x s`` scores; ``s = t`` with
sequence parallelism, else 1)::

    a_layer  = T B (4h / s + (2q + 2kv + 3f) / t)       norm inputs, QKV/attention outputs, SwiGLU
    stored   = full recompute: T B h / s per layer (the layer input) + one a_layer while recomputing
               otherwise:      a_layer per layer
    activations = min(p - stage, micro-batches) * (L / p) * stored-per-layer  (+ a_layer with recompute)

(1F1B keeps up to ``p - stage`` micro-batches in flight on a stage.) The log-prob workspace of the
last stage is the logits and their gradient, ``2 T Vp / t B``, plus the two fp32 chunk buffers of the
vocab-parallel kernel, ``2 min(chunk, T) Vp / t * 4``.

vLLM (colocated: sharing the GPU; disaggregated: on its own GPUs) claims ``utilisation * M`` of a
GPU of ``M`` bytes: its weights, ``P_hf B / rollout.tp``, and the KV cache (with vLLM's own
activation workspace) in the rest, holding ``rest / (2 L kv B / rollout.tp)`` tokens. Each CUDA
process on a GPU costs a context/NCCL allowance of ``CONTEXT_GIB``, and the caching allocator's
fragmentation ``FRAGMENTATION`` of the GPU.

Phases of a colocated step: *generate* (vLLM awake; the actor's state is resident unless offloaded,
and without offloading the allocator also still caches the last training pass) and *train* (vLLM
asleep at level 1: weights on CPU, KV cache freed). The verdict is the worse phase. These are
planning estimates from formulas, not measurements; they err on the side of warning.

The PPO critic and the scalar reward model sit on GPUs of their own (one per rank), so they get their
own columns. With ``Pc`` the value model's parameters (the backbone without LM head, plus a
``h + 1`` head) on ``N = critic.world_size`` ranks in ZeRO stage ``z``::

    critic params     = Pc B / (N if z == 3 else 1)  (+ z == 3: the largest gathered tensor, B max(layer, V h))
    critic grads      = Pc B / N                     (reduce-scattered partition)
    critic optimizer  = 16 Pc / N if B == 2 else 12 Pc / N
                        (fp32 master + Adam m, v, and the fp32 gradient partition when training in 16 bits)
                        -- in host memory, not on the GPU, with ``critic.offload_optimizer``
    critic activations = a_layer (t = s = 1) per layer for ``critic.micro_batch_size`` sequences (HF, no recompute)

(DeepSpeed's own ``estimate_zero2_model_states_mem_needs`` counts 2 + 18/N bytes per parameter for
bf16 ZeRO-2, the same sum.) The reward model (``Pr`` parameters, forward only, bf16) holds
``Pr B`` plus one layer's working set for ``reward.model_batch_size`` sequences.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

GIB = 1024 ** 3
CONTEXT_GIB = 2.0
"""CUDA context, cuBLAS/NCCL workspaces and communicator buffers of one process on one GPU."""
FRAGMENTATION = 0.05
"""Share of the GPU lost to the caching allocator's fragmentation."""
NO_GPU_MEMORY_GIB = 79.2
"""What torch reports for an 80 GB H100/A100; the plan's GPU where none is visible or configured."""


def layer_params(arch: Any, tp: int) -> int:
    """Parameters of one decoder layer on one TP rank."""
    h, f, hd = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    q, kv = arch.num_heads * hd, arch.num_kv_heads * hd
    n = 2 * h + (q + 2 * kv) * h // tp + q * h // tp + 3 * f * h // tp
    if arch.qkv_bias:
        n += (q + 2 * kv) // tp
    if arch.qk_norm:
        n += 2 * hd
    return n


def stage_params(arch: Any, tp: int, pp: int, stage: int) -> int:
    """Parameters of one TP rank of pipeline stage ``stage`` (megatron's allocation)."""
    n = arch.num_layers // pp * layer_params(arch, tp)
    table = arch.padded_vocab_size * arch.hidden_size // tp
    if stage == 0:
        n += table
    if stage == pp - 1:
        n += arch.hidden_size
        if not arch.tie_word_embeddings or pp > 1:
            n += table
    return n


def hf_params(arch: Any) -> int:
    """Parameters of the HF model (unpadded vocabulary, one copy of tied embeddings)."""
    table = arch.vocab_size * arch.hidden_size
    return (arch.num_layers * layer_params(arch, 1) + arch.hidden_size + table
            + (0 if arch.tie_word_embeddings else table))


@dataclass
class Phase:
    name: str
    items: dict[str, float] = field(default_factory=dict)
    """Item -> bytes on one GPU."""

    @property
    def total(self) -> float:
        return sum(self.items.values())


@dataclass
class DeviceGroup:
    """A model on GPUs of its own (the critic, the reward model): what one of its GPUs holds."""

    name: str
    gpus: int
    title: str
    items: dict[str, float]
    """Item -> bytes on one of the group's GPUs."""
    notes: dict[str, str]
    host: dict[str, float] = field(default_factory=dict)
    """Item -> bytes in host memory per rank (offloaded optimizer states)."""

    @property
    def total(self) -> float:
        return sum(self.items.values())


@dataclass
class MemoryPlan:
    gpu_bytes: float
    dtype: str
    stage: int
    pp: int
    offload: bool
    placement: str
    items: dict[str, float]
    """Every figure of the table, in bytes."""
    notes: dict[str, str]
    phases: list[Phase]
    kv_tokens: int
    seq_len: int
    failure: Optional[str] = None
    """The item that breaks the plan, or None when it fits."""
    suggestions: list[str] = field(default_factory=list)
    also: list[str] = field(default_factory=list)
    """Other phases that do not fit either."""
    groups: dict[str, DeviceGroup] = field(default_factory=dict)
    """``critic`` / ``reward model`` on their own GPUs, when the run has them."""

    @property
    def fits(self) -> bool:
        return self.failure is None

    def peak(self) -> Phase:
        return max(self.phases, key=lambda ph: ph.total)

    def table(self) -> str:
        gpu = self.gpu_bytes / GIB
        head = (f"memory per GPU ({self.dtype}, {gpu:.1f} GiB GPUs, pipeline stage {self.stage} of {self.pp}, "
                f"{self.placement}, actor offload {'on' if self.offload else 'off'})")
        rows = [(k, f"{v / GIB:8.2f} GiB", self.notes.get(k, "")) for k, v in self.items.items()]
        rows += [(f"phase: {ph.name}", f"{ph.total / GIB:8.2f} GiB", " + ".join(ph.items)) for ph in self.phases]
        for g in self.groups.values():
            rows.append((f"{g.name} GPU ({g.title})", "", ""))
            rows += [(k, f"{v / GIB:8.2f} GiB", g.notes.get(k, "")) for k, v in g.items.items()]
            rows += [(k, f"{v / GIB:8.2f} GiB", g.notes.get(k, "")) for k, v in g.host.items()]
            rows.append((f"total per {g.name} GPU", f"{g.total / GIB:8.2f} GiB", f"x {g.gpus} GPU(s)"))
        width = max(len(r[0]) for r in rows)
        lines = [head] + [f"  {k:<{width}}  {v}  {n}".rstrip() for k, v, n in rows]
        peak = self.peak()
        if self.fits:
            lines.append(f"memory: fits, peak {peak.total / GIB:.1f} GiB in the {peak.name} phase, headroom "
                         f"{(self.gpu_bytes - peak.total) / GIB:.1f} GiB of {gpu:.1f} GiB")
        else:
            lines.append(f"memory: does NOT fit: {self.failure}")
            lines += [f"  also: {a}" for a in self.also]
            lines += [f"  suggestion: {s}" for s in self.suggestions]
        return "\n".join(lines)


def _gib(x: float) -> str:
    return f"{x / GIB:.1f} GiB"


def plan_memory(cfg: Any, arch: Any, *, dp: int, micro_batches: int, gpu_bytes: float,
                offload: bool, critic_arch: Any = None, reward_arch: Any = None) -> MemoryPlan:
    """The plan for ``cfg`` (a :class:`~megacov.config.schema.MegacovConfig`) on GPUs of ``gpu_bytes``;
    ``critic_arch`` / ``reward_arch`` add the columns of the critic and the reward model."""
    p, r, m = cfg.parallel, cfg.rollout, cfg.model
    tp, pp = p.tp, p.pp
    dtype = "fp32" if m.dtype == "fp32" else ("fp16" if m.dtype == "fp16" else "bf16")
    nb = 4 if dtype == "fp32" else 2
    stages = []
    for stage in range(pp):
        stages.append(_stage_items(cfg, arch, stage, nb, dp, micro_batches))
    stage = max(range(pp), key=lambda s: sum(stages[s][0].values()) + sum(stages[s][1].values()))
    state, transient, notes = stages[stage]
    seq = cfg.data.max_prompt_len + r.max_response_len
    vllm_w = hf_params(arch) * nb / r.tp
    budget = r.gpu_memory_utilization * gpu_bytes
    kv = budget - vllm_w
    kv_per_token = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * nb / r.tp
    kv_tokens = max(0, int(kv // kv_per_token))
    colocated = r.placement == "colocated"
    procs = 2 if colocated else 1
    overhead = procs * CONTEXT_GIB * GIB + FRAGMENTATION * gpu_bytes
    items = dict(state)
    items.update(transient)
    items["vLLM weights"] = vllm_w
    items["vLLM KV cache"] = max(kv, 0.0)
    items["context/NCCL/fragmentation"] = overhead
    notes["vLLM weights"] = f"{hf_params(arch) / 1e9:.2f}B params / rollout.tp={r.tp}"
    notes["vLLM KV cache"] = (f"rest of gpu_memory_utilization={r.gpu_memory_utilization}: "
                              f"{kv_tokens} tokens ({kv_tokens // max(seq, 1)} sequences of {seq})")
    notes["context/NCCL/fragmentation"] = (f"{procs} CUDA process(es) x {CONTEXT_GIB:g} GiB + "
                                           f"{FRAGMENTATION:.0%} of the GPU")
    vllm = {"vLLM weights": vllm_w, "vLLM KV cache": max(kv, 0.0)}
    train = Phase("train", dict(state, **transient))
    train.items["context/NCCL/fragmentation"] = overhead
    phases = [train]
    if colocated:
        gen = Phase("generate", dict(vllm))
        if not offload:
            gen.items.update(state)
            gen.items.update({f"{k} (allocator cache)": v for k, v in transient.items()})
        gen.items["context/NCCL/fragmentation"] = overhead
        phases.insert(0, gen)
    else:
        phases.insert(0, Phase("generate (rollout GPUs)", dict(vllm, **{
            "context/NCCL/fragmentation": CONTEXT_GIB * GIB + FRAGMENTATION * gpu_bytes})))
    plan = MemoryPlan(gpu_bytes=gpu_bytes, dtype=dtype, stage=stage, pp=pp, offload=offload,
                      placement=r.placement, items=items, notes=notes, phases=phases, kv_tokens=kv_tokens,
                      seq_len=seq, groups=model_groups(cfg, critic_arch, reward_arch, gpu_bytes))
    _verdict(plan, cfg, colocated)
    return plan


def value_model_params(arch: Any) -> int:
    """Parameters of the HF backbone without LM head plus a scalar head of ``h`` (+ 1 bias)."""
    return arch.num_layers * layer_params(arch, 1) + arch.hidden_size + arch.vocab_size * arch.hidden_size \
        + arch.hidden_size + 1


def _layer_activations(arch: Any, tokens: int, nb: int) -> float:
    """Saved activations of one decoder layer, no tensor or sequence parallelism (``a_layer``)."""
    h, f = arch.hidden_size, arch.ffn_hidden_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    return tokens * nb * (4 * h + 2 * q + 2 * kv + 3 * f)


def critic_group(cfg: Any, arch: Any) -> DeviceGroup:
    """One critic rank's GPU: DeepSpeed ZeRO-2/3 state, optionally with the optimizer on the host."""
    c = cfg.critic
    nb = 4 if c.dtype == "fp32" else 2  # ``auto`` is bf16 on GPU
    n, z, off = value_model_params(arch), int(c.zero_stage), bool(c.offload_optimizer)
    gathered = nb * max(layer_params(arch, 1), arch.vocab_size * arch.hidden_size) if z == 3 else 0.0
    params = n * nb / (c.world_size if z == 3 else 1) + gathered
    opt = (16 if nb == 2 else 12) * n / c.world_size
    seq = cfg.data.max_prompt_len + cfg.rollout.max_response_len
    acts = arch.num_layers * _layer_activations(arch, c.micro_batch_size * seq, nb)
    items = {"critic params": params, "critic grads": n * nb / c.world_size,
             "critic optimizer states": 0.0 if off else opt, "critic activations": acts,
             "critic context/fragmentation": CONTEXT_GIB * GIB}
    shard = f"sharded over critic.world_size={c.world_size}"
    state = f"{'fp32 master + fp32 grads + ' if nb == 2 else 'fp32 master + '}Adam m, v, {shard}"
    notes = {"critic params": (f"{n / 1e9:.3f}B params, " + (f"{shard} + one gathered layer" if z == 3
                                                              else "replicated (ZeRO-2)")),
             "critic grads": f"partition, {shard}",
             "critic optimizer states": "offloaded to host memory" if off else state,
             "critic activations": f"micro-batch {c.micro_batch_size} x {seq} tokens, {arch.num_layers} layers",
             "critic context/fragmentation": f"one CUDA process x {CONTEXT_GIB:g} GiB"}
    host = {"critic optimizer states (host)": opt} if off else {}
    if off:
        notes["critic optimizer states (host)"] = f"{state}, per rank"
    title = (f"x {c.world_size}, DeepSpeed ZeRO-{z}, {'fp32' if nb == 4 else 'bf16'}, "
             f"optimizer offload {'on' if off else 'off'}")
    return DeviceGroup("critic", int(c.world_size), title, items, notes, host)


def reward_group(cfg: Any, arch: Any) -> DeviceGroup:
    """One reward-model rank's GPU: bf16 weights and one layer's working set of a scoring batch."""
    r = cfg.reward
    n, nb = value_model_params(arch) - 1, 2  # sequence-classification head: h x 1, no bias
    seq = cfg.data.max_prompt_len + cfg.rollout.max_response_len
    items = {"reward model params": n * nb,
             "reward model activations": _layer_activations(arch, r.model_batch_size * seq, nb),
             "reward model context/fragmentation": CONTEXT_GIB * GIB}
    notes = {"reward model params": f"{n / 1e9:.3f}B params, forward only",
             "reward model activations": f"one layer at a time, batch {r.model_batch_size} x {seq} tokens",
             "reward model context/fragmentation": f"one CUDA process x {CONTEXT_GIB:g} GiB"}
    where = f"x {r.model_workers}" if r.model_workers else "in the driver process"
    return DeviceGroup("reward model", max(int(r.model_workers), 1), f"{where}, bf16", items, notes)


def model_groups(cfg: Any, critic_arch: Any, reward_arch: Any, gpu_bytes: float) -> dict[str, DeviceGroup]:
    out = {}
    if critic_arch is not None:
        out["critic"] = critic_group(cfg, critic_arch)
    if reward_arch is not None:
        out["reward model"] = reward_group(cfg, reward_arch)
    return out


def _stage_items(cfg: Any, arch: Any, stage: int, nb: int, dp: int, micro_batches: int
                 ) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
    """(resident training state, per-pass transients, notes) of one pipeline stage."""
    p, r = cfg.parallel, cfg.rollout
    tp, pp = p.tp, p.pp
    n = stage_params(arch, tp, pp, stage)
    shard = dp if (p.use_distributed_optimizer and dp > 1) else 1
    opt_bytes = 12 if nb == 2 else 8
    state = {"actor params": n * nb, "actor grads (fp32)": n * 4.0, "optimizer states": n * opt_bytes / shard,
             "reference model": n * nb}
    h, f = arch.hidden_size, arch.ffn_hidden_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    tokens = p.micro_batch_size * (cfg.data.max_prompt_len + r.max_response_len)
    s = tp if (p.sequence_parallel and tp > 1) else 1
    a_layer = tokens * nb * (4 * h / s + (2 * q + 2 * kv + 3 * f) / tp)
    in_flight = min(pp - stage, max(1, micro_batches))
    layers = arch.num_layers // pp
    recompute = cfg.model.gradient_checkpointing
    per_layer = tokens * nb * h / s if recompute else a_layer
    acts = in_flight * layers * per_layer + (a_layer if recompute else 0.0)
    local_v = arch.padded_vocab_size / tp
    logits = 0.0
    if stage == pp - 1:
        logits = 2 * tokens * local_v * nb + min(p.logprob_workspace_mib * 2**20, 2 * tokens * local_v * 4)
    transient = {"activations": acts, "log-prob workspace": logits}
    notes = {
        "actor params": f"{n / 1e9:.3f}B params on this GPU (TP {tp}, PP stage {stage})",
        "actor grads (fp32)": "megatron DDP grad buffer",
        "optimizer states": (f"{'fp32 main + ' if nb == 2 else ''}Adam m, v"
                             + (f", sharded over DP={dp}" if shard > 1 else ", not sharded")),
        "reference model": "forward-only copy",
        "activations": (f"{'full recompute, ' if recompute else 'no recompute, '}"
                        f"micro-batch {p.micro_batch_size} x {tokens // p.micro_batch_size} tokens, "
                        f"{in_flight} in flight" + (", sequence parallel" if s > 1 else "")),
        "log-prob workspace": ("logits + grad + chunk buffers" if logits else "not on this stage"),
    }
    return state, transient, notes


def _verdict(plan: MemoryPlan, cfg: Any, colocated: bool) -> None:
    gpu = plan.gpu_bytes
    r, p = cfg.rollout, cfg.parallel
    vllm_w = plan.items["vLLM weights"]
    if vllm_w >= r.gpu_memory_utilization * gpu:
        plan.failure = (f"vLLM weights ({_gib(vllm_w)}) exceed rollout.gpu_memory_utilization="
                        f"{r.gpu_memory_utilization} of the GPU ({_gib(r.gpu_memory_utilization * gpu)})")
        plan.suggestions.append(f"raise rollout.tp (now {r.tp}) or rollout.gpu_memory_utilization")
    elif plan.kv_tokens < plan.seq_len:
        plan.failure = (f"vLLM KV cache holds {plan.kv_tokens} tokens, less than one sequence of "
                        f"{plan.seq_len} (max_prompt_len + max_response_len)")
        plan.suggestions.append(f"raise rollout.tp (now {r.tp}) or rollout.gpu_memory_utilization")
    over = [ph for ph in plan.phases if ph.total > gpu]
    _group_verdict(plan, cfg)
    if plan.failure is None and over:
        phase = max(over, key=lambda ph: ph.total)
        plan.failure = f"the {phase.name} phase needs {_gib(phase.total)} of {_gib(gpu)}; {_breaking_item(phase)}"
        _suggest(plan, cfg, phase, colocated)
        plan.also = [f"the {ph.name} phase needs {_gib(ph.total)} too; {_breaking_item(ph)}"
                     for ph in over if ph is not phase]


def _group_verdict(plan: MemoryPlan, cfg: Any) -> None:
    """A critic or reward-model GPU that overflows breaks the plan like an actor phase does."""
    for g in plan.groups.values():
        if g.total <= plan.gpu_bytes:
            continue
        item, size = max(g.items.items(), key=lambda kv: kv[1])
        msg = f"the {g.name} GPU needs {_gib(g.total)} of {_gib(plan.gpu_bytes)}; breaking item: {item} ({_gib(size)})"
        if plan.failure is None:
            plan.failure = msg
        else:
            plan.also.append(msg)
        c = cfg.critic
        if item.endswith("activations"):
            key = "critic.micro_batch_size" if g.name == "critic" else "reward.model_batch_size"
            now = c.micro_batch_size if g.name == "critic" else cfg.reward.model_batch_size
            plan.suggestions.append(f"lower {key} (now {now}) or the sequence lengths")
        if g.name == "critic":
            if c.zero_stage == 2:
                plan.suggestions.append("set critic.zero_stage=3 (parameters sharded too)")
            if not c.offload_optimizer:
                plan.suggestions.append("set critic.offload_optimizer=true (optimizer states in host memory)")
            plan.suggestions.append(f"raise critic.world_size (now {c.world_size}): the ZeRO state per GPU "
                                    f"scales with 1/world_size")


def _breaking_item(phase: Phase) -> str:
    """The item to act on: the largest one that is not vLLM's (vLLM fills its utilisation budget
    whatever it is), or that budget itself when nothing else is there."""
    own = {k: v for k, v in phase.items.items() if not k.startswith(("vLLM", "context"))}
    if own:
        item, size = max(own.items(), key=lambda kv: kv[1])
        return f"breaking item: {item} ({_gib(size)})"
    vllm = sum(v for k, v in phase.items.items() if k.startswith("vLLM"))
    return f"breaking item: the vLLM budget, rollout.gpu_memory_utilization ({_gib(vllm)})"


def _suggest(plan: MemoryPlan, cfg: Any, phase: Phase, colocated: bool) -> None:
    r, p, gpu = cfg.rollout, cfg.parallel, plan.gpu_bytes
    out = plan.suggestions
    state = sum(v for k, v in phase.items.items() if k in ("actor params", "actor grads (fp32)",
                                                           "optimizer states", "reference model"))
    if colocated and phase.name == "generate":
        if not plan.offload:
            out.append("set rollout.offload_actor=true (actor and reference go to CPU while the engines generate)")
        rest = phase.total - r.gpu_memory_utilization * gpu
        util = int((gpu - rest) / gpu * 20) / 20
        if util * gpu > plan.items["vLLM weights"] + plan.seq_len * 1.0:
            out.append(f"lower rollout.gpu_memory_utilization to {util:.2f}")
    if state > 0.3 * phase.total:
        out.append(f"raise parallel.tp/parallel.pp (now {p.tp} x {p.pp}): the actor's state per GPU scales "
                   f"with 1/(tp*pp)")
        if not p.use_distributed_optimizer:
            out.append("set parallel.use_distributed_optimizer=true (optimizer states sharded over DP)")
        elif p.world_size is None or p.world_size // (p.tp * p.pp) == 1:
            out.append("add DP replicas: the distributed optimizer shards the optimizer states over DP")
    if phase.items.get("activations", 0.0) > 0.2 * phase.total:
        if not cfg.model.gradient_checkpointing:
            out.append("set model.gradient_checkpointing=true")
        if p.tp > 1 and not p.sequence_parallel:
            out.append("set parallel.sequence_parallel=true")
    if not out:
        out.append("use more GPUs (parallel.world_size) or shorter sequences")
