"""One step's experience: prompts -> n samples each -> rewards, with DAPO dynamic sampling.

Dynamic sampling (``data.dynamic_sampling``) drops groups whose n rewards are all equal -- their GRPO
advantages are all 0, so they only dilute the loss -- and samples fresh prompts to refill the batch,
for at most ``data.max_refill_rounds`` extra rounds. If the batch is still short after that, it is
completed with dropped groups (which then contribute nothing but their tokens to the normaliser), so
every step trains on exactly ``data.batch_size`` prompts and the layout arithmetic never changes.

Sampling seeds are a pure function of (``rollout.seed``, step, round), so a resumed run samples what
the uninterrupted run sampled.
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


def _generate_groups(engines: Any, prompts: list[PromptRecord], reward_mgr: RewardManager, cfg: Any,
                     seed: int, timer: Timer) -> tuple[list[Group], RewardBatch]:
    ro = cfg.rollout
    with timer("rollout"):
        samples = engines.generate([list(p.prompt_ids) for p in prompts], n=ro.n, temperature=ro.temperature,
                                   top_p=ro.top_p, top_k=ro.top_k, max_tokens=ro.max_response_len,
                                   stop=list(ro.stop), seed=seed)
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
            timer: Timer) -> Rollout:
    """Sample, score and (optionally) filter until the step has ``data.batch_size`` groups."""
    want, dynamic = cfg.data.batch_size, cfg.data.dynamic_sampling
    kept: list[Group] = []
    dropped: list[Group] = []
    errors = timeouts = rounds = 0
    for round_ in range(1 + (cfg.data.max_refill_rounds if dynamic else 0)):
        rounds += 1
        prompts = loader.next(want - len(kept))
        groups, rb = _generate_groups(engines, prompts, reward_mgr, cfg,
                                      step_seed(cfg.rollout.seed, step, round_), timer)
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
    return Rollout(kept, cfg.rollout.n, stats)
