"""DAPO dynamic sampling and overlong filtering: the refill arithmetic, with a scripted generator in
place of vLLM (the real engine cannot be told which groups to make uninformative), and the
``megacov eval`` command's bad-input exits."""
from __future__ import annotations

import os

import pytest
from conftest import addition_prompts

from megacov.cli import main
from megacov.config import load_config
from megacov.data import PromptLoader
from megacov.rewards import RewardManager
from megacov.rollout.engine import Sample
from megacov.trainer.batching import build_actor_batch
from megacov.trainer.rollout import Timer, collect

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples/tiny/config.yaml")


class ScriptedEngine:
    """Prompts ``a+b=`` with even ``a`` get n identical correct answers (an uninformative group);
    odd ``a`` get half right, half wrong-and-truncated. Records every call's seed."""

    def __init__(self, tok):
        self.tok, self.seeds, self.calls = tok, [], 0

    def generate(self, prompt_token_ids, *, n, temperature, top_p, top_k, max_tokens, stop, seed):
        self.calls += 1
        self.seeds.append(seed)
        out = []
        for i, ids in enumerate(prompt_token_ids):
            a, b = self.tok.decode(ids).rstrip("=").split("+")
            for j in range(n):
                right = int(a) % 2 == 0 or j % 2 == 0
                text = str(int(a) + int(b)) if right else "x" * max_tokens
                toks = self.tok(text)["input_ids"] + ([self.tok.eos_token_id] if right else [])
                out.append(Sample(i, toks, text, [-0.5] * len(toks), "stop" if right else "length"))
        return out


@pytest.fixture
def setup(tmp_path):
    return addition_prompts(tmp_path, 20)


def _cfg(*extra):
    return load_config(None, ["data.batch_size=4", "rollout.n=4", "rollout.max_response_len=3", *extra])


def test_dynamic_sampling_keeps_only_informative_groups_and_refills(setup):
    tok, recs = setup
    cfg = _cfg("data.dynamic_sampling=true", "data.max_refill_rounds=4")
    engine = ScriptedEngine(tok)
    loader = PromptLoader(recs, shuffle=False, seed=0)
    ro = collect(engine, loader, RewardManager(cfg.reward), cfg, step=3, timer=Timer())
    assert [g.record.question for g in ro.groups] == ["1+1=", "3+1=", "5+1=", "7+1="]
    assert all(g.informative for g in ro.groups)
    # round 1: prompts 0-3 keep 1, 3; then one request per missing group: 4-5 keep 5, 6 dropped, 7 kept
    assert ro.stats["dynamic/rounds"] == 4 and ro.stats["dynamic/dropped_groups"] == 4
    assert ro.stats["dynamic/filled_with_dropped"] == 0 and loader.cursor == 8
    assert len(set(engine.seeds)) == 4  # each round samples with its own seed


def test_dynamic_sampling_fills_with_dropped_groups_when_rounds_run_out(setup):
    tok, recs = setup
    cfg = _cfg("data.dynamic_sampling=true", "data.max_refill_rounds=0")
    ro = collect(ScriptedEngine(tok), PromptLoader(recs, shuffle=False, seed=0), RewardManager(cfg.reward), cfg,
                 step=1, timer=Timer())
    assert len(ro.groups) == 4 and ro.stats["dynamic/filled_with_dropped"] == 2
    assert [g.informative for g in ro.groups] == [True, True, False, False]


def test_without_dynamic_sampling_every_group_is_kept(setup):
    tok, recs = setup
    cfg = _cfg()
    engine = ScriptedEngine(tok)
    ro = collect(engine, PromptLoader(recs, shuffle=False, seed=0), RewardManager(cfg.reward), cfg, step=1,
                 timer=Timer())
    assert engine.calls == 1 and [g.informative for g in ro.groups] == [False, True, False, True]
    assert ro.array("scores").tolist()[:8] == [1.0] * 4 + [1.0, 0.0, 1.0, 0.0]


def test_overlong_filter_masks_truncated_responses_out_of_the_loss(setup):
    tok, recs = setup
    cfg = _cfg("data.overlong_filter=true")
    ro = collect(ScriptedEngine(tok), PromptLoader(recs, shuffle=False, seed=0), RewardManager(cfg.reward), cfg,
                 step=1, timer=Timer())
    truncated = ro.flat("truncated")
    batch, _ = build_actor_batch(ro.prompt_ids, ro.flat("response_ids"), pad_id=0,
                                 train_rows=[not t for t in truncated])
    trained = batch.response_mask.any(dim=1).tolist()
    assert trained == [not t for t in truncated] and any(truncated) and any(trained)


@pytest.mark.parametrize("extra, message", [
    (["--model", "/nonexistent"], "not an HF model directory"),
    (["data.eval_files=[/nonexistent.jsonl]"], "dataset file not found"),
    (["data.eval_files=[]"], "nothing to evaluate"),
])
def test_eval_cli_bad_input_exits_2(tmp_path, capsys, extra, message):
    from megacov.tiny import build_example

    paths = build_example(str(tmp_path / "model"), str(tmp_path / "data"))
    base = [f"model.path={paths['model']}", f"data.train_files=[{paths['train']}]",
            f"data.eval_files=[{paths['eval']}]", f"trainer.output_dir={tmp_path}/runs"]
    assert main(["eval", CONFIG, *base, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("megacov: error: ") and message in err[-1]


@pytest.mark.parametrize("extra, message", [
    (["data.train_files=[{bad}]"], "row 2: invalid JSON"),
    (["reward.name=no_such_module_xyz:fn"], "cannot be loaded"),
    (["trainer.resume=/nonexistent/step_1"], "an existing checkpoint folder"),
])
def test_train_cli_bad_input_exits_2_before_starting_workers(tmp_path, capsys, extra, message):
    from megacov.tiny import build_example

    paths = build_example(str(tmp_path / "model"), str(tmp_path / "data"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": \n')
    base = [f"model.path={paths['model']}", f"data.train_files=[{paths['train']}]",
            f"data.eval_files=[{paths['eval']}]", f"trainer.output_dir={tmp_path}/runs", "trainer.sft_steps=0"]
    assert main(["train", CONFIG, *base, *[e.format(bad=bad) for e in extra]]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("megacov: error: ") and message in last
