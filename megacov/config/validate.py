"""Checks run by ``--dry-run`` and before every run: value ranges, the parallel layout against the
model's shape, the reward function, the data files.

These run before any worker is started, so a bad value costs a second, not a cluster allocation (or
a warm-start). Every failure is a :class:`ConfigError` whose one-line message names the key, file or
row involved; the CLI turns it into exit code 2.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

from megacov.config import ConfigError
from megacov.config.schema import MegacovConfig


@dataclass(frozen=True)
class ModelShape:
    """The few architecture numbers the layout depends on, read from an HF ``config.json``."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    hidden_size: int
    architecture: str
    num_experts: int = 0
    """Routed experts per MoE layer (0 for dense models)."""

    @classmethod
    def from_hf_dir(cls, path: str) -> "ModelShape":
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise ConfigError(f"model.path: no config.json in '{path}'")
        with open(cfg_file) as fh:
            return cls.from_hf(json.load(fh))

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelShape":
        heads = int(hf["num_attention_heads"])
        return cls(
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            architecture=(hf.get("architectures") or ["?"])[0],
            num_experts=int(hf.get("num_experts") or hf.get("num_local_experts") or 0),
        )


@dataclass(frozen=True)
class LayoutPlan:
    """What a run will occupy; printed by ``megacov train --dry-run``."""

    world_size: int
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    micro_batches_per_mini_batch: int
    mini_batches_per_step: int
    sequences_per_step: int
    rollout_engines: int
    rollout_tp: int
    placement: str
    devices_needed: int
    num_gpus: int
    ep: int = 1

    def table(self) -> str:
        rows = [
            ("world size (training ranks)", self.world_size),
            ("actor TP x PP x DP", f"{self.tp} x {self.pp} x {self.dp}"
             + (f" (experts over EP={self.ep} of the DP ranks)" if self.ep > 1 else "")),
            ("sequences per RL step", self.sequences_per_step),
            ("mini-batches per step", self.mini_batches_per_step),
            ("micro-batches per mini-batch (per DP rank)", self.micro_batches_per_mini_batch),
            ("micro-batch size", self.micro_batch_size),
            ("rollout engines x TP", f"{self.rollout_engines} x {self.rollout_tp}"),
            ("placement", self.placement),
            ("devices needed", f"{self.devices_needed} GPU(s)" if self.num_gpus else
             f"{self.world_size} CPU process(es) on gloo + {self.rollout_engines} vLLM engine(s)"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _ge(lo: float) -> tuple[str, Callable[[Any], bool]]:
    return f">= {lo:g}", lambda v: v >= lo


def _gt(lo: float) -> tuple[str, Callable[[Any], bool]]:
    return f"> {lo:g}", lambda v: v > lo


def _between(lo: float, hi: float, low_open: bool = False, high_open: bool = False) -> tuple[str, Callable]:
    text = f"in {'(' if low_open else '['}{lo:g}, {hi:g}{')' if high_open else ']'}"
    return text, lambda v: (v > lo if low_open else v >= lo) and (v < hi if high_open else v <= hi)


_ANY: tuple[str, Callable[[Any], bool]] = ("finite", lambda v: True)

#: The allowed range of every numeric setting (``None`` always passes for optional ones; lists are
#: checked element by element).
RANGES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "model.vocab_divisible_by": _ge(1),
    "parallel.tp": _ge(1), "parallel.pp": _ge(1), "parallel.dp": _ge(1), "parallel.world_size": _ge(1),
    "parallel.micro_batch_size": _ge(1), "parallel.max_tokens_per_micro_batch": _ge(1),
    "parallel.num_gpus": _ge(0), "parallel.logprob_workspace_mib": _gt(0),
    "rollout.engines": _ge(1), "rollout.tp": _ge(1), "rollout.n": _ge(1), "rollout.temperature": _gt(0),
    "rollout.top_p": _between(0, 1, low_open=True), "rollout.top_k": ("-1 (off) or >= 1", lambda v: v == -1 or v >= 1),
    "rollout.max_response_len": _ge(1), "rollout.gpu_memory_utilization": _between(0, 1, low_open=True),
    "rollout.cpu_kvcache_space_gb": _ge(1), "rollout.sync_bucket_mb": _ge(1), "rollout.cpus_per_engine": _ge(1),
    "rollout.mismatch_sample": _ge(0), "rollout.seed": _ge(0),
    "rollout.generate_timeout_s": _gt(0), "rollout.weight_update_timeout_s": _gt(0),
    "rollout.max_engine_restarts": _ge(0), "trainer.rank_timeout_s": _gt(0),
    "algorithm.clip_ratio_low": _between(0, 1), "algorithm.clip_ratio_high": _ge(0),
    "algorithm.clip_ratio_c": _gt(1), "algorithm.clip_cov_ratio": _between(0, 1, low_open=True),
    "algorithm.clip_cov_lb": _ANY, "algorithm.clip_cov_ub": _ANY,
    "algorithm.kl_cov_ratio": _between(0, 1, low_open=True), "algorithm.kl_cov_coef": _ge(0),
    "algorithm.entropy_coef": _ANY, "algorithm.entropy_target": _ge(0), "algorithm.entropy_coef_delta": _ge(0),
    "algorithm.entropy_coef_min": _ANY, "algorithm.entropy_coef_max": _ANY, "algorithm.par_lambda": _between(0, 1),
    "algorithm.par_delta": _ge(0), "algorithm.kl_coef": _ge(0), "algorithm.ppo_epochs": _ge(1),
    "algorithm.seed": _ge(0), "algorithm.par_stage_steps": _ge(1), "algorithm.par_stage_lambdas": _between(0, 1),
    "reward.timeout_s": _gt(0), "reward.workers": _ge(0), "reward.overlong_penalty": _ge(0),
    "algorithm.gspo_clip_ratio_low": _between(0, 1, high_open=True), "algorithm.gspo_clip_ratio_high": _ge(0),
    "algorithm.cispo_clip_ratio_low": _between(0, 1), "algorithm.cispo_clip_ratio_high": _ge(0),
    "algorithm.entropy_top_ratio": _between(0, 1, low_open=True), "algorithm.entropy_advantage_coef": _ge(0),
    "algorithm.entropy_advantage_kappa": _gt(0), "algorithm.rollout_is_cap": _gt(0),
    "algorithm.rollout_mis_low": _ge(0), "algorithm.rollout_mis_high": _gt(0),
    "model.moe_aux_loss_coeff": _ge(0), "model.moe_z_loss_coeff": _ge(0),
    "parallel.ep": _ge(1), "optim.loss_scale": _gt(0), "parallel.gpu_memory_gib": _gt(0),
    "algorithm.gamma": _between(0, 1, low_open=True), "algorithm.lam": _between(0, 1),
    "critic.world_size": _ge(1), "critic.zero_stage": ("2 or 3", lambda v: v in (2, 3)), "critic.lr": _gt(0),
    "critic.lr_warmup_steps": _ge(0), "critic.weight_decay": _ge(0), "critic.clip_grad": _ge(0),
    "critic.micro_batch_size": _ge(1), "critic.value_clip": _ge(0), "critic.warmup_steps": _ge(0),
    "critic.cpus_per_worker": _ge(1), "critic.seed": _ge(0), "critic.ppo_epochs": _ge(1),
    "reward.model_batch_size": _ge(1), "reward.model_workers": _ge(0), "reward.model_weight": _ANY,
    "reward.rule_weight": _ANY,
    "data.max_prompt_len": _ge(1), "data.batch_size": _ge(1), "data.mini_batch_size": _ge(1), "data.seed": _ge(0),
    "data.max_refill_rounds": _ge(0),
    "optim.lr": _ge(0), "optim.min_lr": _ge(0), "optim.lr_warmup_steps": _ge(0), "optim.weight_decay": _ge(0),
    "optim.adam_beta1": _between(0, 1, high_open=True), "optim.adam_beta2": _between(0, 1, high_open=True),
    "optim.adam_eps": _gt(0), "optim.clip_grad": _ge(0),
    "trainer.total_steps": _ge(1), "trainer.total_epochs": _ge(1), "trainer.eval_every": _ge(0),
    "trainer.eval_n": _ge(1), "trainer.eval_temperature": _gt(0), "trainer.seed": _ge(0), "trainer.sft_steps": _ge(0),
    "trainer.sft_lr": _gt(0), "trainer.cpus_per_worker": _ge(1), "trainer.predict_ceiling_every": _ge(0),
    "trainer.max_skipped_steps": _ge(0),
    "checkpoint.save_every": _ge(0), "checkpoint.keep_last": _ge(0), "checkpoint.export_hf_every": _ge(0),
}


def _value(cfg: MegacovConfig, dotted: str) -> Any:
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def check_ranges(cfg: MegacovConfig) -> None:
    """Every numeric setting within its range (and finite), plus the few relations between them."""
    for key, (text, ok) in RANGES.items():
        value = _value(cfg, key)
        for item in (value if isinstance(value, list) else [value]):
            if item is None:
                continue
            _require(isinstance(item, (int, float)) and math.isfinite(item), f"{key}={value} must be a finite number")
            _require(ok(item), f"{key}={value} must be {text}" + (" (each entry)" if isinstance(value, list) else ""))
    o = cfg.optim
    _require(o.min_lr <= o.lr or o.lr == 0, f"optim.min_lr={o.min_lr} must be <= optim.lr={o.lr}")
    _require(cfg.data.mini_batch_size <= cfg.data.batch_size,
             f"data.mini_batch_size={cfg.data.mini_batch_size} must be <= data.batch_size={cfg.data.batch_size}")
    r = cfg.trainer.resume
    _require(r in ("auto", "never") or os.path.isdir(r),
             f"trainer.resume='{r}' must be auto, never or an existing checkpoint folder")


def _check_positive(cfg: MegacovConfig) -> None:
    for key, value in [
        ("parallel.tp", cfg.parallel.tp), ("parallel.pp", cfg.parallel.pp), ("parallel.ep", cfg.parallel.ep),
        ("parallel.micro_batch_size", cfg.parallel.micro_batch_size),
        ("rollout.engines", cfg.rollout.engines), ("rollout.tp", cfg.rollout.tp),
        ("rollout.n", cfg.rollout.n), ("data.batch_size", cfg.data.batch_size),
        ("data.mini_batch_size", cfg.data.mini_batch_size),
    ]:
        _require(value >= 1, f"{key}={value} must be >= 1")
    if cfg.parallel.dp is not None:
        _require(cfg.parallel.dp >= 1, f"parallel.dp={cfg.parallel.dp} must be >= 1")
    _require(cfg.parallel.logprob_workspace_mib > 0,
             f"parallel.logprob_workspace_mib={cfg.parallel.logprob_workspace_mib} must be > 0")


def _world_and_dp(cfg: MegacovConfig) -> tuple[int, int]:
    p = cfg.parallel
    mp = p.tp * p.pp
    if p.world_size is None:
        dp = p.dp or 1
        return mp * dp, dp
    _require(p.world_size % mp == 0,
             f"parallel.world_size={p.world_size} is not a multiple of parallel.tp*parallel.pp={mp}")
    dp = p.world_size // mp
    _require(p.dp is None or p.dp == dp,
             f"parallel.dp={p.dp} disagrees with parallel.world_size/(tp*pp)={dp}")
    return p.world_size, dp


def _check_model(cfg: MegacovConfig, shape: ModelShape) -> None:
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    _require(shape.num_heads % tp == 0,
             f"parallel.tp={tp} does not divide the model's {shape.num_heads} attention heads")
    _require(shape.num_kv_heads % tp == 0,
             f"parallel.tp={tp} does not divide the model's {shape.num_kv_heads} KV heads")
    _require(shape.num_layers % pp == 0,
             f"parallel.pp={pp} does not divide the model's {shape.num_layers} layers")
    ep = cfg.parallel.ep
    _require(ep == 1 or shape.num_experts > 0,
             f"parallel.ep={ep} needs a mixture-of-experts model; {shape.architecture} has no experts")
    _require(shape.num_experts == 0 or shape.num_experts % ep == 0,
             f"parallel.ep={ep} does not divide the model's {shape.num_experts} experts")
    rtp = cfg.rollout.tp
    _require(shape.num_heads % rtp == 0,
             f"rollout.tp={rtp} does not divide the model's {shape.num_heads} attention heads")


def _count_gpus(cfg: MegacovConfig) -> int:
    """GPUs of the job: the Ray cluster's when one is given (trainer.ray_address / $RAY_ADDRESS; the
    driver may sit on a node with none, or with one node's share), else this machine's."""
    from megacov.workers.cluster import resolve_address

    address = resolve_address(cfg.trainer.ray_address)
    if address is None:
        # torch is already a dependency; importing it here is fine (the dry run needs no megatron/vllm).
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    import ray

    from megacov.workers.cluster import connect_ray

    try:
        if not ray.is_initialized():
            connect_ray(cfg.trainer.ray_address)
        return int(ray.cluster_resources().get("GPU", 0))
    except Exception as exc:  # noqa: BLE001 - any failure to reach the cluster is the same advice
        raise ConfigError(f"parallel.num_gpus is unset and the Ray cluster at {address} cannot be asked "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                          f"set parallel.num_gpus") from None


def plan_layout(cfg: MegacovConfig, shape: Optional[ModelShape] = None) -> LayoutPlan:
    """Validate the layout arithmetic and return what the run will occupy."""
    _check_positive(cfg)
    world, dp = _world_and_dp(cfg)
    _require(dp % cfg.parallel.ep == 0,
             f"parallel.ep={cfg.parallel.ep} does not divide the data-parallel size {dp} "
             f"(experts are split over DP ranks; world_size / (tp*pp) = {dp})")
    if shape is not None:
        _check_model(cfg, shape)
    d, r = cfg.data, cfg.rollout
    _require(d.batch_size % d.mini_batch_size == 0,
             f"data.batch_size={d.batch_size} is not a multiple of data.mini_batch_size={d.mini_batch_size}")
    seqs_per_mini = d.mini_batch_size * r.n
    _require(seqs_per_mini % dp == 0,
             f"data.mini_batch_size*rollout.n={seqs_per_mini} sequences do not split over dp={dp} ranks")
    per_rank = seqs_per_mini // dp
    mbs = cfg.parallel.micro_batch_size
    _require(per_rank % mbs == 0,
             f"parallel.micro_batch_size={mbs} does not divide the {per_rank} sequences per DP rank "
             f"of a mini-batch (data.mini_batch_size*rollout.n/dp)")
    placement = r.placement
    _require(placement in ("colocated", "disaggregated"),
             f"rollout.placement='{placement}' must be 'colocated' or 'disaggregated'")
    num_gpus = cfg.parallel.num_gpus if cfg.parallel.num_gpus is not None else _count_gpus(cfg)
    rollout_devices = r.engines * r.tp
    if placement == "colocated":
        needed = max(world, rollout_devices)
    else:
        needed = world + rollout_devices
    if num_gpus > 0:
        _require(needed <= num_gpus,
                 f"layout needs {needed} GPUs (parallel.tp*pp*dp={world}, rollout.engines*tp="
                 f"{rollout_devices}, rollout.placement={placement}) but parallel.num_gpus={num_gpus}")
    return LayoutPlan(
        world_size=world, tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=dp, micro_batch_size=mbs,
        micro_batches_per_mini_batch=per_rank // mbs,
        mini_batches_per_step=d.batch_size // d.mini_batch_size,
        sequences_per_step=d.batch_size * r.n, rollout_engines=r.engines, rollout_tp=r.tp,
        placement=placement, devices_needed=needed, num_gpus=num_gpus, ep=cfg.parallel.ep,
    )


def validate(cfg: MegacovConfig, check_model: bool = True, check_inputs: bool = False) -> LayoutPlan:
    """All start-up checks. Returns the layout plan; raises ConfigError on the first problem.

    ``check_inputs`` also resolves the reward function and reads every data file (what ``--dry-run``
    and ``megacov train`` do before starting anything)."""
    check_ranges(cfg)
    shape = ModelShape.from_hf(model_hf_config(cfg)[0]) if check_model else None
    plan = plan_layout(cfg, shape)
    _check_choices(cfg)
    if cfg.parallel.pack_sequences:
        from megacov.models.core import transformer_engine_available  # lazy: pulls in megatron

        _require(not transformer_engine_available(), "parallel.pack_sequences=true needs megatron's local "
                 "attention, but TransformerEngine is installed (its packed THD path is not wired)")
    _check_critic_and_reward_model(cfg, plan, check_model)
    from megacov.algorithms.checks import warn_algorithm_config  # lazy: pulls in torch

    warn_algorithm_config(cfg)
    if check_inputs:
        check_reward(cfg)
        check_data(cfg)
    return plan


def check_reward(cfg: MegacovConfig) -> None:
    """The reward function resolves (imports its module); ``judge`` has a judge model directory."""
    from megacov.rewards import RewardSpecError, reward_spec, resolve

    r = cfg.reward
    if r.name == "judge":
        _require(bool(r.judge_model), "reward.name=judge needs reward.judge_model (an HF directory)")
        _require(os.path.isfile(os.path.join(str(r.judge_model), "config.json")),
                 f"reward.judge_model: no config.json in '{r.judge_model}'")
        return
    try:
        resolve(reward_spec(r.name))
    except RewardSpecError as exc:
        raise ConfigError(f"reward.name: {exc}") from None


def check_data(cfg: MegacovConfig) -> None:
    """Every data file exists, is readable, and its rows parse (``data.on_bad_row`` applies)."""
    from megacov.data import DataError
    from megacov.data.prompts import scan_rows

    d = cfg.data
    for key, paths in (("data.train_files", d.train_files), ("data.eval_files", d.eval_files),
                       ("data.sft_files", d.sft_files)):
        if key == "data.train_files":
            _require(len(paths) > 0, "data.train_files is empty")
        for path in paths:
            try:
                scan_rows(path, d.prompt_key, d.answer_key, d.on_bad_row)
            except DataError as exc:
                raise ConfigError(f"{key}: {exc}") from None


def _check_critic_and_reward_model(cfg: MegacovConfig, plan: LayoutPlan, check_model: bool) -> None:
    from megacov.critic.plan import check_critic
    from megacov.rewards.model import RewardSpecError, check_reward_model

    check_critic(cfg, plan.devices_needed, plan.num_gpus)
    if check_model:
        try:
            check_reward_model(cfg.reward, cfg.model.path)
        except RewardSpecError as exc:
            raise ConfigError(str(exc)) from None


def _check_choices(cfg: MegacovConfig) -> None:
    a = cfg.algorithm
    choices = {
        "algorithm.cov_scope": (a.cov_scope, ("global", "global_old", "micro_batch")),
        "algorithm.loss_agg_mode": (a.loss_agg_mode, ("token-mean", "seq-mean-token-sum",
                                                      "seq-mean-token-mean", "seq-mean-token-sum-norm")),
        "data.on_bad_row": (cfg.data.on_bad_row, ("error", "skip")),
        "trainer.mode": (cfg.trainer.mode, ("rl", "sft")),
        "parallel.backend": (cfg.parallel.backend, ("auto", "nccl", "gloo")),
        "model.dtype": (cfg.model.dtype, ("auto", "fp32", "bf16", "fp16")),
        "optim.lr_decay_style": (cfg.optim.lr_decay_style, ("constant", "linear", "cosine", "inverse-square-root")),
        "reward.judge_mode": (cfg.reward.judge_mode, ("soft", "binary")),
        "rollout.sync_transport": (cfg.rollout.sync_transport, ("auto", "object_store", "cuda_ipc", "nccl")),
    }
    for key, (value, allowed) in choices.items():
        _require(value in allowed, f"{key}='{value}' must be one of {', '.join(allowed)}")


# ---- the model's architecture and the memory plan (``--dry-run``) ------------------------------

def model_hf_config(cfg: MegacovConfig) -> tuple[dict, str]:
    """``(hf_config, source)``: ``model.config`` (preset, file or directory) when set, else
    ``model.path/config.json``. A missing one is a one-line error listing the presets."""
    from megacov.config.presets import load_model_config, preset_names

    presets = ", ".join(preset_names())
    key, ref = ("model.config", cfg.model.config) if cfg.model.config else ("model.path", cfg.model.path)
    try:
        return load_model_config(ref)
    except FileNotFoundError:
        hint = "" if key == "model.config" else "; set model.config to a config.json or a preset to plan without it"
        raise ConfigError(f"{key}='{ref}': no such preset or config.json (presets: {presets}){hint}") from None
    except ValueError as exc:  # json.JSONDecodeError included
        raise ConfigError(f"{key}='{ref}': unreadable config.json ({str(exc).splitlines()[0]})") from None


def _gpu_memory_bytes(cfg: MegacovConfig) -> float:
    from megacov.config.memory import GIB, NO_GPU_MEMORY_GIB

    if cfg.parallel.gpu_memory_gib is not None:
        _require(cfg.parallel.gpu_memory_gib > 0, "parallel.gpu_memory_gib must be > 0")
        return cfg.parallel.gpu_memory_gib * GIB
    import torch

    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory)
    return NO_GPU_MEMORY_GIB * GIB


def offload_enabled(cfg: MegacovConfig, on_gpu: bool) -> bool:
    """``rollout.offload_actor`` resolved: None means on exactly for colocated GPU runs."""
    if cfg.rollout.offload_actor is not None:
        return bool(cfg.rollout.offload_actor)
    return on_gpu and cfg.rollout.placement == "colocated"


def memory_plan(cfg: MegacovConfig, plan: LayoutPlan):  # -> megacov.config.memory.MemoryPlan
    """The per-GPU memory plan of a GPU run (``None`` for a CPU run: nothing to plan)."""
    if plan.num_gpus <= 0:
        return None
    from megacov.config.memory import plan_memory
    from megacov.models.arch import arch_from_hf
    from megacov.models.family import UnsupportedModelError

    hf, source = model_hf_config(cfg)
    try:
        arch = arch_from_hf(hf, vocab_divisible_by=cfg.model.vocab_divisible_by, tp=plan.tp)
    except (UnsupportedModelError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from None
    critic_arch = reward_arch = None
    if cfg.algorithm.advantage == "gae":  # the critic: its own checkpoint, or the actor's architecture
        critic_arch = _side_arch(cfg, "critic.model_path", cfg.critic.model_path) if cfg.critic.model_path else arch
    if cfg.reward.name == "model" and cfg.reward.model_path:
        reward_arch = _side_arch(cfg, "reward.model_path", cfg.reward.model_path)
    return plan_memory(cfg, arch, dp=plan.dp, micro_batches=plan.micro_batches_per_mini_batch,
                       gpu_bytes=_gpu_memory_bytes(cfg), offload=offload_enabled(cfg, on_gpu=True),
                       critic_arch=critic_arch, reward_arch=reward_arch)


def _side_arch(cfg: MegacovConfig, key: str, path: str):  # -> megacov.models.arch.Arch
    """The architecture of the critic's or the reward model's own checkpoint (its config.json)."""
    from megacov.models.arch import arch_from_hf
    from megacov.models.family import UnsupportedModelError

    cfg_file = os.path.join(path, "config.json")
    try:
        with open(cfg_file) as fh:
            hf = json.load(fh)
        return arch_from_hf(hf, vocab_divisible_by=cfg.model.vocab_divisible_by, tp=1)
    except FileNotFoundError:
        raise ConfigError(f"{key}='{path}': no config.json") from None
    except (UnsupportedModelError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{key}='{path}': {str(exc).splitlines()[0]}") from None
