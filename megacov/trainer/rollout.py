"""One step's experience: prompts -> n samples each -> rewards, with DAPO dynamic sampling.

Dynamic sampling (``data.dynamic_sampling``) drops groups whose n rewards are all equal -- their GRPO
advantages are all 0, so they only dilute the loss -- and samples fresh prompts to refill the batch,
for at most ``data.max_refill_rounds`` extra rounds. If the batch is still short after that, it is
completed with dropped groups (which then contribute nothing but their tokens to the normaliser), so
every step trains on exactly ``data.batch_size`` prompts and the layout arithmetic never changes.

Sampling seeds are a pure function of (``rollout.seed``, step, round), so a resumed run samples what
the uninterrupted run sampled.

With ``trainer.async_rollout`` the first round of a step's generation is :func:`launch` ed one step
early and :func:`collect` finishes it (rewards, refills); every rollout carries the policy version
that generated it. A finished rollout waiting for its step is written into the checkpoint as JSON
(:func:`rollout_to_json`), so a resumed run trains on exactly the batch the killed one had made.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from megacov.data import PromptLoader, PromptRecord
from megacov.rewards import RewardBatch, RewardManager


class Timer:
    """Wall-clock seconds accumulated per phase of a step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def total(self) -> float:
        return time.perf_counter() - self.start


@dataclass
class Group:
    """The n samples of one prompt."""

    record: PromptRecord
    response_ids: list[list[int]]
    logprobs: list[list[float]]
    texts: list[str]
    truncated: list[bool]
    scores: np.ndarray
    raw: np.ndarray
    correct: np.ndarray

    @property
    def informative(self) -> bool:
        return bool(np.ptp(self.scores) > 0)


@dataclass
class Rollout:
    """The experience of one RL step, groups in order; sequence i*n + j is sample j of prompt i."""

    groups: list[Group]
    n: int
    stats: dict[str, float] = field(default_factory=dict)
    version: int = 0
    """Policy version of the engines that generated it (the step whose update made those weights)."""
    epoch: int = 1
    """Epoch of the prompt stream once its prompts were drawn (1-based)."""

    @property
    def prompt_ids(self) -> list[list[int]]:
        return [list(g.record.prompt_ids) for g in self.groups for _ in range(self.n)]

    def flat(self, name: str) -> list[Any]:
        return [x for g in self.groups for x in getattr(g, name)]

    def array(self, name: str) -> np.ndarray:
        return np.concatenate([getattr(g, name) for g in self.groups])


def step_seed(base: int, step: int, round_: int) -> int:
    """Seed of one generate call; engines add the prompt index, so calls must be > 2**16 apart."""
    return (base * 1_000_003 + step * 64 + round_) * 65_536 % (2**31 - 1)


@dataclass
class Launched:
    """The first generate round of a step, started on the engines before that step began."""

    step: int
    prompts: list[PromptRecord]
    pending: Any
    """What ``engines.submit_generate`` returned; ``result()`` waits for the samples."""
    version: int
    position: dict[str, Any]
    """The loader's position before the prompts were drawn (a redo after an engine fault starts there)."""


def _sampling(cfg: Any, seed: int) -> dict[str, Any]:
    ro = cfg.rollout
    return {"n": ro.n, "temperature": ro.temperature, "top_p": ro.top_p, "top_k": ro.top_k,
            "max_tokens": ro.max_response_len, "stop": list(ro.stop), "seed": seed}


def launch(engines: Any, loader: PromptLoader, cfg: Any, step: int, version: int) -> Launched:
    """Draw step ``step``'s prompts and start their first round on the engines, without waiting."""
    position = loader.state_dict()
    prompts = loader.next(cfg.data.batch_size)
    pending = engines.submit_generate([list(p.prompt_ids) for p in prompts],
                                      **_sampling(cfg, step_seed(cfg.rollout.seed, step, 0)))
    return Launched(step, prompts, pending, version, position)


def _generate_groups(engines: Any, prompts: list[PromptRecord], reward_mgr: RewardManager, cfg: Any,
                     seed: int, timer: Timer, pending: Any = None) -> tuple[list[Group], RewardBatch]:
    ro = cfg.rollout
    with timer("rollout"):
        if pending is not None:  # launched earlier: only the rest of its generation is waited for here
            samples = pending.result()
        else:
            samples = engines.generate([list(p.prompt_ids) for p in prompts], **_sampling(cfg, seed))
    if len(samples) != len(prompts) * ro.n:
        raise RuntimeError(f"engines returned {len(samples)} samples for {len(prompts)} prompts x n={ro.n}")
    truncated = [s.finish_reason == "length" for s in samples]
    with timer("reward"):
        rb = reward_mgr.score([s.text for s in samples], [p.answer for p in prompts for _ in range(ro.n)],
                              [p.question for p in prompts for _ in range(ro.n)], truncated)
    groups = []
    for i, rec in enumerate(prompts):
        sl = slice(i * ro.n, (i + 1) * ro.n)
        chunk = samples[sl]
        groups.append(Group(rec, [list(s.token_ids) for s in chunk], [list(s.logprobs) for s in chunk],
                            [s.text for s in chunk], truncated[sl], rb.scores[sl], rb.raw[sl], rb.correct[sl]))
    return groups, rb


def collect(engines: Any, loader: PromptLoader, reward_mgr: RewardManager, cfg: Any, step: int,
            timer: Timer, launched: Launched | None = None, version: int = 0) -> Rollout:
    """Sample, score and (optionally) filter until the step has ``data.batch_size`` groups. With
    ``launched`` its first round is already on the engines (the tag is then its version)."""
    want, dynamic = cfg.data.batch_size, cfg.data.dynamic_sampling
    kept: list[Group] = []
    dropped: list[Group] = []
    errors = timeouts = rounds = 0
    if launched is not None:
        assert launched.step == step, f"the batch launched for step {launched.step} is not step {step}'s"
        version = launched.version
    for round_ in range(1 + (cfg.data.max_refill_rounds if dynamic else 0)):
        rounds += 1
        first = launched if round_ == 0 else None
        prompts = first.prompts if first is not None else loader.next(want - len(kept))
        groups, rb = _generate_groups(engines, prompts, reward_mgr, cfg, step_seed(cfg.rollout.seed, step, round_),
                                      timer, pending=first.pending if first is not None else None)
        errors, timeouts = errors + rb.errors, timeouts + rb.timeouts
        for g in groups:
            (kept if (not dynamic or g.informative) else dropped).append(g)
        if len(kept) >= want:
            break
    filled = max(0, want - len(kept))
    kept = (kept + dropped[:filled])[:want]
    stats = {"reward/errors": float(errors), "reward/timeouts": float(timeouts)}
    if dynamic:
        stats.update({"dynamic/rounds": float(rounds), "dynamic/dropped_groups": float(len(dropped)),
                      "dynamic/filled_with_dropped": float(filled)})
    return Rollout(kept, cfg.rollout.n, stats, version=version, epoch=loader.epoch + 1)


# -- a finished rollout in a checkpoint: JSON (floats round-trip exactly), never a pickle ----------


def rollout_to_json(ro: Rollout) -> dict[str, Any]:
    groups = [{"record": {"uid": g.record.uid, "source": g.record.source, "row": g.record.row,
                          "prompt_ids": list(g.record.prompt_ids), "question": g.record.question,
                          "answer": g.record.answer},
               "response_ids": g.response_ids, "logprobs": g.logprobs, "texts": g.texts, "truncated": g.truncated,
               "scores": g.scores.tolist(), "raw": g.raw.tolist(), "correct": g.correct.tolist(),
               "dtypes": [str(g.scores.dtype), str(g.raw.dtype), str(g.correct.dtype)]}
              for g in ro.groups]
    return {"n": ro.n, "stats": ro.stats, "version": ro.version, "epoch": ro.epoch, "groups": groups}


def rollout_from_json(obj: dict[str, Any]) -> Rollout:
    groups = []
    for g in obj["groups"]:
        r = g["record"]
        rec = PromptRecord(int(r["uid"]), r["source"], int(r["row"]), tuple(int(t) for t in r["prompt_ids"]),
                           r["question"], r["answer"])
        s_dt, r_dt, c_dt = g["dtypes"]
        groups.append(Group(rec, [list(x) for x in g["response_ids"]], [list(x) for x in g["logprobs"]],
                            list(g["texts"]), list(g["truncated"]), np.asarray(g["scores"], dtype=s_dt),
                            np.asarray(g["raw"], dtype=r_dt), np.asarray(g["correct"], dtype=c_dt)))
    return Rollout(groups, int(obj["n"]), dict(obj["stats"]), version=int(obj["version"]), epoch=int(obj["epoch"]))
