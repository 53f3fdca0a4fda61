"""Async rollout without Ray: the launched first round, the staleness bound, the saved next batch,
the overlap figures and the refusal of a colocated layout.

A scripted engine stands in for vLLM here (its samples are a pure function of prompt and seed), so a
batch whose first round was launched a step early can be compared with one generated in place.
"""
from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import addition_prompts

from megacov.cli import main
from megacov.config import load_config
from megacov.data import PromptLoader
from megacov.rewards import RewardManager
from megacov.rollout.engine import Sample
from megacov.trainer.rollout import Rollout, Timer, collect, launch, rollout_to_json
from megacov.trainer.run import RunContext, load_next_rollout, save_next_rollout
from megacov.trainer.step_metrics import timing_metrics

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples/tiny/config.yaml")


class SeededEngine:
    """Sample j of prompt i: a pure function of (prompt, seed + i, j). Odd ``a`` in ``a+1=`` answers
    right only for even j (an informative group); ``submit_generate`` defers the work to ``result()``."""

    def __init__(self, tok):
        self.tok, self.log = tok, []

    def generate(self, prompt_token_ids, *, n, temperature, top_p, top_k, max_tokens, stop, seed):
        self.log.append(("generate", seed))
        return self._samples(prompt_token_ids, n, max_tokens, seed)

    def submit_generate(self, prompt_token_ids, *, n, temperature, top_p, top_k, max_tokens, stop, seed):
        self.log.append(("submit", seed))
        engine = self

        class Pending:
            def result(self):
                engine.log.append(("result", seed))
                return engine._samples(prompt_token_ids, n, max_tokens, seed)
        return Pending()

    def _samples(self, prompts, n, max_tokens, seed):
        out = []
        for i, ids in enumerate(prompts):
            a, b = self.tok.decode(ids).rstrip("=").split("+")
            rng = np.random.default_rng([seed, i])
            for j in range(n):
                right = int(a) % 2 == 0 or j % 2 == 0
                text = str(int(a) + int(b)) if right else "x" * max_tokens
                toks = self.tok(text)["input_ids"] + ([self.tok.eos_token_id] if right else [])
                lps = (-rng.random(len(toks))).tolist()
                lps[0] = -math.inf if not right else lps[0]  # an impossible token still round-trips
                out.append(Sample(i, toks, text, lps, "stop" if right else "length"))
        return out


@pytest.fixture
def setup(tmp_path):
    return addition_prompts(tmp_path, 40)


def _cfg(*extra):
    return load_config(None, ["data.batch_size=4", "rollout.n=4", "rollout.max_response_len=3", *extra])


def _same(a: Rollout, b: Rollout) -> None:
    assert json.dumps(rollout_to_json(a)) == json.dumps(rollout_to_json(b))


@pytest.mark.parametrize("dynamic", [False, True])
def test_launched_batch_equals_the_batch_generated_in_place(setup, dynamic):
    """Launch step 2's first round before step 1's batch is used, finish it later: the same prompts,
    seeds, samples, refills and loader position as generating step 2 in place."""
    tok, recs = setup
    extra = ("data.dynamic_sampling=true", "data.max_refill_rounds=3") if dynamic else ()
    cfg = _cfg(*extra)
    rewards = RewardManager(cfg.reward)
    sync_loader, sync_engine = PromptLoader(recs, shuffle=True, seed=3), SeededEngine(tok)
    sync = [collect(sync_engine, sync_loader, rewards, cfg, step, Timer(), version=step - 1) for step in (1, 2)]

    loader, engine = PromptLoader(recs, shuffle=True, seed=3), SeededEngine(tok)
    first = collect(engine, loader, rewards, cfg, 1, Timer(), version=0)
    launched = launch(engine, loader, cfg, 2, version=0)
    assert engine.log[-1][0] == "submit"  # nothing waited for yet
    second = collect(engine, loader, rewards, cfg, 2, Timer(), launched=launched, version=7)
    _same(first, sync[0])
    assert second.version == 0  # the tag of the launch, not of the engines at collect time
    second.version = sync[1].version = 0
    _same(second, sync[1])
    assert loader.state_dict() == sync_loader.state_dict()
    assert [s for _, s in engine.log if _ != "submit"] == [s for _, s in sync_engine.log]
    if dynamic:
        assert second.stats["dynamic/rounds"] > 1  # the refills ran after the launched round
    with pytest.raises(AssertionError, match="not step 3's"):
        collect(engine, loader, rewards, cfg, 3, Timer(), launched=launch(engine, loader, cfg, 4, version=0))


def test_saved_next_batch_round_trips_exactly_as_json(setup, tmp_path):
    tok, recs = setup
    cfg = _cfg()
    ro = collect(SeededEngine(tok), PromptLoader(recs, shuffle=False, seed=0), RewardManager(cfg.reward), cfg, 1,
                 Timer(), version=5)
    save_next_rollout(str(tmp_path), ro)
    back = load_next_rollout(str(tmp_path))
    assert back.version == 5 and back.epoch == ro.epoch and back.stats == ro.stats
    for g, h in zip(ro.groups, back.groups):
        assert g.record == h.record and g.response_ids == h.response_ids and g.texts == h.texts
        assert g.logprobs == h.logprobs and g.truncated == h.truncated  # -inf and every float bit kept
        for name in ("scores", "raw", "correct"):
            x, y = getattr(g, name), getattr(h, name)
            assert x.dtype == y.dtype and np.array_equal(x, y)
    assert any(math.isinf(x) for lps in ro.flat("logprobs") for x in lps)
    assert load_next_rollout(str(tmp_path / "nothing")) is None
    with open(tmp_path / "next_rollout.json", "w") as fh:
        fh.write('{"n": 4}')
    from megacov.trainer.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="next_rollout.json: not a saved rollout"):
        load_next_rollout(str(tmp_path))


@pytest.mark.parametrize("actor, tag, bound, ok", [(3, 3, 0, True), (3, 2, 0, False), (3, 2, 1, True),
                                                   (3, 1, 1, False), (3, 4, 1, False)])
def test_staleness_is_bounded_and_refused_beyond(actor, tag, bound, ok):
    ctx = SimpleNamespace(actor_version=actor, _stale_ok=bound, async_rollout=bound == 1)
    ro = Rollout([], 1, version=tag)
    if ok:
        assert RunContext.staleness(ctx, ro) == actor - tag
    else:
        with pytest.raises(RuntimeError, match=f"staleness {actor - tag} outside"):
            RunContext.staleness(ctx, ro)


def test_idle_fractions_from_busy_times():
    m = timing_metrics({"rollout": 1.0, "logprob": 2.0, "update": 4.0, "sync": 1.0}, 10.0, 100, 50, engine_s=6.0)
    assert m["time/actor_busy"] == 6.0 and m["time/engine_busy"] == 6.0
    assert m["perf/actor_idle_frac"] == pytest.approx(0.4) and m["perf/engine_idle_frac"] == pytest.approx(0.4)


def test_async_rollout_with_colocated_placement_is_refused_at_dry_run(tmp_path, capsys):
    from megacov.tiny import build_example

    paths = build_example(str(tmp_path / "model"), str(tmp_path / "data"))
    base = [f"model.path={paths['model']}", f"data.train_files=[{paths['train']}]",
            f"data.eval_files=[{paths['eval']}]", f"trainer.output_dir={tmp_path}/runs", "trainer.sft_steps=0",
            "trainer.async_rollout=true"]
    capsys.readouterr()  # the example's build progress
    assert main(["train", CONFIG, *base, "rollout.placement=colocated", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megacov: error: trainer.async_rollout=true cannot overlap")
    assert "rollout.placement=disaggregated" in err[0]
    assert main(["train", CONFIG, *base, "rollout.placement=disaggregated", "--dry-run"]) == 0
    assert "rollout: async, one step off-policy" in capsys.readouterr().out
