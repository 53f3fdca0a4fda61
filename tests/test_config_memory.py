"""The dry run's memory plan: hand-computed figures for two presets, megatron's real parameter count
at TP/PP in {1,2}, the verdict and its breaking item, and bad ``model.config`` input."""
from __future__ import annotations

import json
import os

import pytest

from megacov.cli import main
from megacov.config import load_config
from megacov.config.memory import GIB, hf_params, plan_memory, stage_params
from megacov.config.presets import load_model_config, preset_names
from megacov.config.validate import memory_plan, validate
from megacov.models.arch import arch_from_hf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_32B = os.path.join(REPO, "examples", "cluster", "qwen2.5-32b-klcov.yaml")
NOT_FITTING_70B = ["model.config=llama-3.1-70b", "parallel.tp=8", "parallel.pp=1", "parallel.dp=1",
                   "parallel.world_size=8", "parallel.num_gpus=8", "rollout.engines=2", "rollout.tp=4",
                   "rollout.gpu_memory_utilization=0.9", "parallel.gpu_memory_gib=79.2"]


def _arch(name: str, tp: int = 1):
    return arch_from_hf(load_model_config(name)[0], vocab_divisible_by=128, tp=tp)


def test_every_preset_is_a_supported_architecture_with_its_published_size():
    published_billions = {"qwen2.5-7b": 7.62, "qwen2.5-14b": 14.77, "qwen2.5-32b": 32.76, "qwen2.5-72b": 72.71,
                          "qwen3-8b": 8.19, "qwen3-32b": 32.76, "llama-3.1-8b": 8.03, "llama-3.1-70b": 70.55}
    assert preset_names() == sorted(published_billions)
    for name, billions in published_billions.items():
        assert hf_params(_arch(name)) / 1e9 == pytest.approx(billions, abs=0.006), name


def test_parameter_counts_by_hand():
    # Qwen2.5-32B: h=5120, q=5120, kv=1024, f=27648, V=152064, 64 layers, QKV bias, untied.
    layer = 2 * 5120 + (5120 + 2048) * 5120 + (5120 + 2048) + 5120 * 5120 + 3 * 27648 * 5120
    assert layer == 487_605_248
    assert hf_params(_arch("qwen2.5-32b")) == 64 * layer + 5120 + 2 * 152064 * 5120 == 32_763_876_352
    # TP 8, last of 2 stages: 32 layers at 1/8, the final norm and the output layer (Vp = 152064).
    layer_tp8 = 2 * 5120 + 7168 * 5120 // 8 + 7168 // 8 + 5120 * 5120 // 8 + 3 * 27648 * 5120 // 8
    assert stage_params(_arch("qwen2.5-32b", 8), 8, 2, 1) == 32 * layer_tp8 + 5120 + 152064 * 5120 // 8 \
        == 2_048_033_792
    # Llama-3.1-8B: no bias, untied, V=128256.
    layer = 2 * 4096 + (4096 + 2048) * 4096 + 4096 * 4096 + 3 * 14336 * 4096
    assert hf_params(_arch("llama-3.1-8b")) == 32 * layer + 4096 + 2 * 128256 * 4096 == 8_030_261_248


def test_memory_figures_of_the_32b_example_by_hand():
    cfg = load_config(EXAMPLE_32B, ["parallel.gpu_memory_gib=80"])
    plan = memory_plan(cfg, validate(cfg))
    n = 2_048_033_792  # parameters of stage 1 (the most loaded: it holds the logits), above
    items = plan.items
    assert plan.stage == 1 and plan.offload  # colocated GPU run: offload on by default
    assert items["actor params"] == items["reference model"] == 2 * n
    assert items["actor grads (fp32)"] == 4 * n
    assert items["optimizer states"] == 12 * n / 2  # fp32 main + m + v, sharded over DP 2
    tokens = 2048 + 8192
    # full recompute + sequence parallel: one layer input per layer (1 micro-batch in flight on the
    # last stage) plus one layer's activations while it is recomputed.
    a_layer = tokens * 2 * (4 * 5120 / 8 + (2 * 5120 + 2 * 1024 + 3 * 27648) / 8)
    assert items["activations"] == pytest.approx(32 * tokens * 2 * 5120 / 8 + a_layer)
    assert items["log-prob workspace"] == pytest.approx(2 * tokens * 19008 * 2 + 16 * 2**20)  # logits (bf16, kept for backward) + the 16 MiB kernel workspace
    assert items["vLLM weights"] == pytest.approx(32_763_876_352 * 2 / 4)
    kv = 0.6 * 80 * GIB - 32_763_876_352 * 2 / 4
    assert items["vLLM KV cache"] == pytest.approx(kv)
    assert plan.kv_tokens == int(kv // (2 * 64 * 8 * 128 * 2 / 4))
    assert plan.fits, plan.table()
    # without offloading, the actor's state stays beside vLLM while it generates: no longer fits
    off = memory_plan(load_config(EXAMPLE_32B, ["parallel.gpu_memory_gib=80", "rollout.offload_actor=false"]),
                      validate(cfg))
    assert not off.fits and "generate phase" in off.failure and "optimizer states" in off.failure
    assert any("rollout.offload_actor=true" in s for s in off.suggestions)


def test_70b_on_eight_gpus_names_the_optimizer_states():
    cfg = load_config(EXAMPLE_32B, NOT_FITTING_70B)
    plan = memory_plan(cfg, validate(cfg))
    assert not plan.fits
    assert "train phase" in plan.failure and "breaking item: optimizer states" in plan.failure, plan.failure
    n = stage_params(_arch("llama-3.1-70b", 8), 8, 1, 0)
    assert plan.items["optimizer states"] == 12 * n  # DP 1: nothing to shard over
    assert any("parallel.tp/parallel.pp" in s for s in plan.suggestions)


def test_vllm_weights_over_budget_and_kv_cache_too_small():
    cfg = load_config(EXAMPLE_32B, ["rollout.tp=1", "rollout.engines=32", "parallel.gpu_memory_gib=80"])
    plan = memory_plan(cfg, validate(cfg))
    assert not plan.fits and "vLLM weights" in plan.failure  # 61 GiB of weights in a 48 GiB budget
    cfg = load_config(EXAMPLE_32B, ["rollout.gpu_memory_utilization=0.195", "parallel.gpu_memory_gib=80"])
    plan = memory_plan(cfg, validate(cfg))
    assert not plan.fits and "KV cache holds" in plan.failure


def test_cpu_runs_have_no_memory_plan():
    cfg = load_config(None, ["parallel.num_gpus=0"])
    assert memory_plan(cfg, validate(cfg, check_model=False)) is None


def test_dry_run_prints_the_table_and_exits_by_verdict(capsys, tmp_path):
    assert main(["train", EXAMPLE_32B, "parallel.gpu_memory_gib=79.2", "--dry-run"]) == 2  # no data here
    out = capsys.readouterr()
    assert "memory: fits" in out.out and "dataset file not found: /data/dapo-math/train.parquet" in out.err
    rows = tmp_path / "train.jsonl"
    rows.write_text('{"prompt": "1+1?", "reward_model": "2"}\n')
    data = [f"data.train_files={rows}", "data.eval_files=[]"]
    assert main(["train", EXAMPLE_32B, "parallel.gpu_memory_gib=79.2", *data, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "memory per GPU (bf16, 79.2 GiB GPUs" in out and "memory: fits" in out and "vLLM KV cache" in out
    assert main(["train", EXAMPLE_32B, *NOT_FITTING_70B, *data, "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert "memory: does NOT fit: the train phase" in out and "suggestion:" in out


@pytest.mark.parametrize("override", ["model.config=qwen9-1t", "model.config=/nonexistent/config.json",
                                      "model.path=/nonexistent"])
def test_bad_model_config_is_one_line_listing_presets_and_exit_2(override, capsys, tmp_path):
    args = ["train", EXAMPLE_32B, override, "--dry-run"]
    if override.startswith("model.path"):
        args.insert(2, "model.config=null")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "presets: llama-3.1-70b" in err and "qwen3-8b" in err, err


def test_model_config_accepts_a_directory_or_file(tmp_path):
    hf, _ = load_model_config("qwen3-8b")
    (tmp_path / "config.json").write_text(json.dumps(hf))
    for ref in (str(tmp_path), str(tmp_path / "config.json"), "Qwen3-8B"):
        cfg = load_config(EXAMPLE_32B, [f"model.config={ref}"])
        assert memory_plan(cfg, validate(cfg)).items["actor params"] > 0


# ---- megatron's own count --------------------------------------------------------------------

TINY = {
    "qwen2_bias_untied": dict(architectures=["Qwen2ForCausalLM"], hidden_size=64, intermediate_size=96,
                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=67,
                              tie_word_embeddings=False, hidden_act="silu"),
    "qwen3_qknorm_tied": dict(architectures=["Qwen3ForCausalLM"], hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                              vocab_size=67, tie_word_embeddings=True, hidden_act="silu"),
    "llama_tied": dict(architectures=["LlamaForCausalLM"], hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, vocab_size=67, tie_word_embeddings=True,
                       hidden_act="silu"),
}


def _count_worker(rank: int, world: int, layouts: list, dirs: dict) -> dict:
    from megatron.core import parallel_state

    from megacov.models import build_model
    from megacov.parallel.layout import ParallelLayout

    out, layout = {}, None
    for tp, pp in layouts:
        if layout is not None:
            parallel_state.destroy_model_parallel()
        layout = ParallelLayout.initialize(tp, pp, seed=1)
        for name, path in dirs.items():
            model, info = build_model(path, layout, load_weights=False, dtype="fp32")
            out[(tp, pp, name)] = (layout.pp_rank, sum(p.numel() for p in model.parameters()), info.arch)
    layout.destroy()
    return out


def _check_counts(results: list, layouts: list) -> None:
    for tp, pp in layouts:
        for name in TINY:
            for per_rank in results:
                stage, numel, arch = per_rank[(tp, pp, name)]
                assert stage_params(arch, tp, pp, stage) == numel, (name, tp, pp, stage)
                if arch.tie_word_embeddings and pp == 2 and stage == 1:
                    # megatron's own copy of a tied output layer on the last stage: a count that
                    # leaves it out (as for one stage) must be caught
                    assert stage_params(arch, tp, pp, stage) - arch.padded_vocab_size * arch.hidden_size // tp != numel


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("counts")
    dirs = {}
    for name, hf in TINY.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(hf))
        dirs[name] = str(root / name)
    return dirs


def test_parameter_count_equals_megatron_two_ranks(tiny_dirs):
    from megacov.parallel.spawn import run_distributed

    layouts = [(1, 1), (2, 1), (1, 2)]
    _check_counts(run_distributed(_count_worker, 2, layouts, tiny_dirs, timeout_s=600), layouts)


@pytest.mark.slow
def test_parameter_count_equals_megatron_tp2_pp2(tiny_dirs):
    from megacov.parallel.spawn import run_distributed

    _check_counts(run_distributed(_count_worker, 4, [(2, 2)], tiny_dirs, timeout_s=600), [(2, 2)])


def test_gpu_count_comes_from_the_ray_cluster_when_one_is_given(monkeypatch):
    """The driver may run where there are no GPUs (or one node's): the plan asks the cluster. An
    unreachable one is a one-line error naming the key that avoids asking."""
    from megacov.config import ConfigError
    from megacov.parallel.spawn import free_port

    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match="set parallel.num_gpus"):
        validate(load_config(None, []), check_model=False)
    validate(load_config(None, ["parallel.num_gpus=0"]), check_model=False)  # given: nothing asked


def test_disaggregated_rollout_gpus_are_planned_apart():
    cfg = load_config(EXAMPLE_32B, ["rollout.placement=disaggregated", "parallel.num_gpus=64",
                                    "parallel.gpu_memory_gib=80"])
    plan = memory_plan(cfg, validate(cfg))
    names = [ph.name for ph in plan.phases]
    assert names == ["generate (rollout GPUs)", "train"]
    assert "vLLM weights" not in plan.phases[1].items and "optimizer states" not in plan.phases[0].items
    assert plan.fits


# -- the critic's and the reward model's own GPUs ------------------------------------------------------

def _side_plan(overrides, critic="qwen2.5-7b", reward=None):
    from megacov.config.memory import value_model_params

    cfg = load_config(EXAMPLE_32B, ["algorithm.advantage=gae", *overrides])
    plan = plan_memory(cfg, _arch("qwen2.5-32b", 8), dp=2, micro_batches=4, gpu_bytes=80 * GIB, offload=True,
                       critic_arch=_arch(critic) if critic else None, reward_arch=_arch(reward) if reward else None)
    return cfg, plan, value_model_params(_arch(critic or reward))


def test_critic_rows_by_hand_zero2_and_zero3_shard_by_dp():
    a = _arch("qwen2.5-7b")
    pc = hf_params(a) - a.vocab_size * a.hidden_size + a.hidden_size + 1  # no LM head, a scalar head
    tokens = 4 * (2048 + 8192)  # critic.micro_batch_size x (max_prompt_len + max_response_len)
    acts = 28 * tokens * 2 * (4 * 3584 + 2 * 3584 + 2 * 512 + 3 * 18944)
    _, z2, n = _side_plan(["critic.zero_stage=2", "critic.world_size=2", "critic.micro_batch_size=4"])
    assert n == pc
    g = z2.groups["critic"]
    assert g.items["critic params"] == 2 * pc  # ZeRO-2: parameters replicated
    assert g.items["critic grads"] == 2 * pc / 2
    assert g.items["critic optimizer states"] == 16 * pc / 2  # fp32 master + grads + Adam m, v over DP 2
    assert g.items["critic activations"] == pytest.approx(acts)
    assert g.host == {}
    _, z3, _ = _side_plan(["critic.zero_stage=3", "critic.world_size=4", "critic.micro_batch_size=4"])
    g3 = z3.groups["critic"]
    assert g3.items["critic params"] == 2 * pc / 4 + 2 * a.vocab_size * a.hidden_size  # + the gathered embedding
    assert g3.items["critic grads"] == 2 * pc / 4 and g3.items["critic optimizer states"] == 16 * pc / 4
    assert g3.total < g.total
    table = z3.table()
    assert "critic GPU (x 4, DeepSpeed ZeRO-3, bf16, optimizer offload off)" in table
    assert "total per critic GPU" in table and "reward model" not in table


def test_critic_offload_moves_optimizer_states_to_host_and_fp32_counts_12_bytes():
    a = _arch("qwen2.5-7b")
    _, plan, pc = _side_plan(["critic.offload_optimizer=true", "critic.world_size=2"])
    g = plan.groups["critic"]
    assert g.items["critic optimizer states"] == 0.0
    assert g.host == {"critic optimizer states (host)": 16 * pc / 2}
    assert "critic optimizer states (host)" in plan.table() and "optimizer offload on" in plan.table()
    _, fp32, _ = _side_plan(["critic.dtype=fp32", "critic.world_size=2"])
    f = fp32.groups["critic"]
    assert f.items["critic optimizer states"] == 12 * pc / 2 and f.items["critic params"] == 4 * pc
    del a


def test_a_critic_too_big_for_its_gpu_breaks_the_plan_with_zero_suggestions():
    short = ["data.max_prompt_len=512", "rollout.max_response_len=1536", "critic.micro_batch_size=1"]
    _, plan, _ = _side_plan(["critic.zero_stage=2", "critic.world_size=1", *short], critic="qwen2.5-72b")
    assert not plan.fits
    assert "the critic GPU needs" in plan.failure and "breaking item: critic optimizer states" in plan.failure
    assert any("critic.zero_stage=3" in s for s in plan.suggestions)
    assert any("critic.offload_optimizer=true" in s for s in plan.suggestions)
    _, sharded, _ = _side_plan(["critic.zero_stage=3", "critic.world_size=16", "critic.offload_optimizer=true",
                                *short], critic="qwen2.5-72b")
    assert sharded.fits, sharded.table()
    _, long, _ = _side_plan(["critic.zero_stage=3", "critic.world_size=16", "critic.micro_batch_size=8"],
                            critic="qwen2.5-72b")
    assert "breaking item: critic activations" in long.failure
    assert any("lower critic.micro_batch_size (now 8)" in s for s in long.suggestions)


def test_reward_model_rows():
    _, plan, pr = _side_plan(["reward.name=model", "reward.model_batch_size=8", "reward.model_workers=2"],
                             critic=None, reward="qwen2.5-7b")
    a = _arch("qwen2.5-7b")
    g = plan.groups["reward model"]
    assert g.items["reward model params"] == 2 * (pr - 1)  # bf16, a bias-free scalar head
    assert g.items["reward model activations"] == pytest.approx(8 * (2048 + 8192) * 2 * (
        4 * 3584 + 2 * 3584 + 2 * 512 + 3 * 18944))
    assert g.gpus == 2 and "critic" not in plan.groups
    assert "reward model GPU (x 2, bf16)" in plan.table()
    del a


def test_dry_run_prints_the_critic_rows(capsys, tmp_path):
    rows = tmp_path / "train.jsonl"
    rows.write_text('{"prompt": "1+1?", "reward_model": "2"}\n')
    args = ["train", EXAMPLE_32B, "parallel.gpu_memory_gib=79.2", f"data.train_files={rows}", "data.eval_files=[]",
            "algorithm.advantage=gae", "parallel.num_gpus=40", "critic.world_size=8", "critic.zero_stage=3",
            "critic.micro_batch_size=1", "critic.offload_optimizer=true", "data.max_prompt_len=512",
            "rollout.max_response_len=1536", "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "critic GPU (x 8, DeepSpeed ZeRO-3" in out and "critic optimizer states" in out and "memory: fits" in out
