"""Supervised warm-start with the same Megatron actor, cached so that it runs once per setting.

RL from a random tiny model learns nothing (every reward is 0, every GRPO advantage 0); a short SFT
on (prompt, answer) pairs gives it a non-trivial success rate to sharpen. The warm-start reuses the
RL machinery end to end -- the actor worker, its optimizer, the packed batch layout -- with one loss
swapped in: ``sft_nll``, the token-mean negative log-likelihood of the response tokens, registered
like any policy loss so the exact global normalisation over micro-batches and DP ranks applies.

The result is exported as an HF directory under ``<output_dir>/sft-cache/<key>``, where the key hashes
everything that determines the weights (model, data files, steps, LR, seed, batch, layout, dtype).
A second run with the same settings -- e.g. ppo, clip_cov and kl_cov compared from one start --
finds it and skips the warm-start; a kill mid-way leaves no cache entry (temp folder + rename).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Optional

from megacov.trainer.sft_loss import SFT_LOSS

log = logging.getLogger(__name__)


def sft_hparams(algo_cfg: Any) -> Any:
    """The algorithm section with the SFT loss and nothing that needs rollouts or a reference."""
    return dataclasses.replace(algo_cfg, policy_loss=SFT_LOSS, cov_scope="micro_batch", kl_coef=0.0,
                               entropy_coef=0.0, entropy_control="none", loss_agg_mode="token-mean")


def _file_id(path: str) -> str:
    """SHA-256 of the file's bytes: a byte-identical model or dataset in another folder, or touched
    without change, keys the same warm-start; an edited one never reuses a stale entry. (Hashing
    reads every byte; warm-starts are for small models, so this costs well under a second.)"""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(cfg: Any, plan: Any) -> str:
    files = list(cfg.data.sft_files or cfg.data.train_files)
    weights = sorted(f for f in os.listdir(cfg.model.path) if f.endswith((".safetensors", ".json")))
    blob = {
        "model": [[f, _file_id(os.path.join(cfg.model.path, f))] for f in weights],
        "data": [_file_id(f) for f in files], "keys": [cfg.data.prompt_key, cfg.data.answer_key],
        "steps": cfg.trainer.sft_steps, "lr": sft_lr(cfg), "seed": cfg.trainer.seed,
        "batch": cfg.data.batch_size * cfg.rollout.n, "layout": [plan.tp, plan.pp, plan.dp],
        "mbs": cfg.parallel.micro_batch_size, "dtype": cfg.model.dtype, "max_prompt_len": cfg.data.max_prompt_len,
        "optim": {k: v for k, v in dataclasses.asdict(sft_optim(cfg)).items() if k != "lr"},  # lr: sft_lr above
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def sft_lr(cfg: Any) -> float:
    return float(cfg.trainer.sft_lr if cfg.trainer.sft_lr is not None else cfg.optim.lr)


def sft_optim(cfg: Any) -> Any:
    """The warm-start's optimizer: RL's Adam settings at ``sft_lr``, held constant. The RL schedule
    (warmup, decay to ``min_lr``) is counted in RL updates; applied to the warm-start's own steps it
    would change the start whenever the RL schedule changes, so runs compared from "one start" with
    different schedules would not share it. (``trainer.mode=sft`` has no RL part and keeps the
    schedule.)"""
    return dataclasses.replace(cfg.optim, lr=sft_lr(cfg), lr_decay_style="constant", lr_warmup_steps=0,
                               min_lr=0.0)


def cached_warm_start(cfg: Any, plan: Any) -> Optional[str]:
    path = os.path.join(cfg.trainer.output_dir, "sft-cache", cache_key(cfg, plan))
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def run_sft(cfg: Any, plan: Any, tokenizer: Any, runtime: Any, *, steps: int, out_dir: str, optim: Any,
            metrics_path: Optional[str] = None) -> str:
    """Train ``steps`` SFT updates from ``cfg.model.path`` with the optimizer settings ``optim`` and
    export the result to ``out_dir``, on an actor group of ``runtime`` (connected) that is shut down
    afterwards."""
    from megacov.data import PromptLoader, load_from_config, sft_examples
    from megacov.trainer.batching import build_actor_batch, seq_multiple
    from megacov.trainer.session import export_hf

    records = load_from_config(list(cfg.data.sft_files or cfg.data.train_files), tokenizer, cfg.data)
    examples = sft_examples(records, tokenizer, cfg.rollout.max_response_len)
    loader = PromptLoader(records, shuffle=True, seed=cfg.data.seed + 1)
    per_step = cfg.data.batch_size * cfg.rollout.n
    sft_cfg = dataclasses.replace(cfg, optim=optim)
    hp = sft_hparams(cfg.algorithm)
    import ray

    actor = runtime.start_actor(cfg.model.path, total_updates=steps, cfg=sft_cfg, with_reference=False)
    sink = open(metrics_path, "w") if metrics_path else None
    try:
        start = time.perf_counter()
        for step in range(1, steps + 1):
            chosen = [examples[r.uid] for r in loader.next(per_step)]
            batch, _ = build_actor_batch([e.prompt_ids for e in chosen], [e.response_ids for e in chosen],
                                         pad_id=tokenizer.pad_token_id or 0,
                                         multiple=seq_multiple(cfg.parallel))
            out = actor.update(ray.put(batch), per_step, step=step, controls=None, algo_cfg=hp, epochs=1)[0]
            row = {"step": step, "sft/nll": out["pg_loss"], "sft/grad_norm": out["grad_norm"],
                   "sft/lr": out["lr"], "time/elapsed": time.perf_counter() - start}
            if sink:
                sink.write(json.dumps(row) + "\n")
                sink.flush()
            if step == 1 or step % max(1, steps // 10) == 0 or step == steps:
                log.info("warm-start step %d/%d: nll %.4f", step, steps, out["pg_loss"])
        export_hf(actor, cfg.model.path, out_dir)
    finally:
        if sink:
            sink.close()
        runtime.stop_actor()
    return out_dir


def warm_start(cfg: Any, plan: Any, tokenizer: Any, runtime: Any) -> str:
    """The HF directory RL starts from: the cached warm-start, or a fresh one (then cached)."""
    cached = cached_warm_start(cfg, plan)
    if cached is not None:
        log.info("warm-start: using cached %s", cached)
        return cached
    out = os.path.join(cfg.trainer.output_dir, "sft-cache", cache_key(cfg, plan))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    log.info("warm-start: %d SFT steps -> %s", cfg.trainer.sft_steps, out)
    return run_sft(cfg, plan, tokenizer, runtime, steps=cfg.trainer.sft_steps, out_dir=out, optim=sft_optim(cfg),
                   metrics_path=out.rstrip("/") + ".metrics.jsonl")
