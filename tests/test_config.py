"""Configuration: defaults <- YAML <- key=value, unknown keys with suggestions, impossible layouts."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest

from megacov.config import ConfigError, MegacovConfig, load_config, to_yaml
from megacov.config.validate import ModelShape, plan_layout

SHAPE = ModelShape(num_layers=4, num_heads=4, num_kv_heads=2, vocab_size=67, hidden_size=128,
                   architecture="Qwen2ForCausalLM")


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_defaults_yaml_and_overrides_layer_in_order(tmp_path):
    path = _write(tmp_path, """
        parallel: {tp: 2, micro_batch_size: 2}
        algorithm: {policy_loss: clip_cov}
    """)
    cfg = load_config(path, ["parallel.tp=4", "rollout.temperature=0.7", "data.train_files=[a.jsonl,b.jsonl]"])
    assert isinstance(cfg, MegacovConfig)
    assert cfg.parallel.tp == 4  # override beats YAML
    assert cfg.parallel.micro_batch_size == 2  # YAML beats default
    assert cfg.algorithm.policy_loss == "clip_cov"
    assert cfg.rollout.temperature == pytest.approx(0.7)
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"]
    assert cfg.algorithm.clip_cov_ratio == MegacovConfig().algorithm.clip_cov_ratio  # untouched default


def test_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["algorithm.policy_loss=kl_cov", "parallel.pp=2"])
    path = tmp_path / "saved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("where,expected", [
    ("yaml", "did you mean 'algorithm.clip_cov_ratio'"),
    ("override", "did you mean 'algorithm.clip_cov_ratio'"),
])
def test_unknown_key_suggests_closest(tmp_path, where, expected):
    if where == "yaml":
        path, overrides = _write(tmp_path, "algorithm: {clip_cov_ration: 0.1}\n"), []
    else:
        path, overrides = None, ["algorithm.clip_cov_ration=0.1"]
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(path, overrides)
    assert "algorithm.clip_cov_ration" in str(info.value)


def test_unknown_section_and_bad_types_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'rollout'"):
        load_config(None, ["rollot.n=4"])
    with pytest.raises(ConfigError, match="parallel.tp"):
        load_config(None, ["parallel.tp=two"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["parallel.tp"])


def _cfg(**sections) -> MegacovConfig:
    sections.setdefault("parallel", {}).setdefault("num_gpus", 0)  # CPU unless a test says otherwise
    cfg = MegacovConfig()
    for name, values in sections.items():
        cfg = replace(cfg, **{name: replace(getattr(cfg, name), **values)})
    return cfg


def test_valid_layout_plan():
    cfg = _cfg(parallel=dict(tp=2, pp=2, world_size=8, micro_batch_size=2),
               data=dict(batch_size=16, mini_batch_size=8), rollout=dict(n=4, engines=2, tp=2))
    plan = plan_layout(cfg, SHAPE)
    assert (plan.world_size, plan.dp) == (8, 2)
    assert plan.micro_batches_per_mini_batch == 8 * 4 // 2 // 2
    assert plan.mini_batches_per_step == 2
    table = plan.table()
    for fragment in ("2 x 2 x 2", "2 x 2", "colocated"):
        assert fragment in table


@pytest.mark.parametrize("sections,keys", [
    (dict(parallel=dict(tp=3)), "parallel.tp=3"),                       # heads 4 not divisible by 3
    (dict(parallel=dict(tp=4)), "KV heads"),                            # kv heads 2 not divisible by 4
    (dict(parallel=dict(pp=3)), "parallel.pp=3"),                       # layers 4 not divisible by 3
    (dict(parallel=dict(tp=2, world_size=6, pp=2)), "parallel.world_size=6"),
    (dict(parallel=dict(micro_batch_size=3)), "parallel.micro_batch_size=3"),
    (dict(data=dict(batch_size=6, mini_batch_size=4)), "data.batch_size=6"),
    (dict(parallel=dict(tp=2, num_gpus=1)), "parallel.num_gpus=1"),     # more GPUs asked than exist
    (dict(parallel=dict(tp=2, num_gpus=2), rollout=dict(placement="disaggregated")), "disaggregated"),
    (dict(rollout=dict(tp=3)), "rollout.tp=3"),
    (dict(rollout=dict(n=0)), "rollout.n=0"),
])
def test_impossible_layouts_name_the_keys(sections, keys):
    with pytest.raises(ConfigError) as info:
        plan_layout(_cfg(**sections), SHAPE)
    message = str(info.value)
    assert keys in message
    assert "\n" not in message


def _megacov(*args: str, cwd=None):
    return subprocess.run([sys.executable, "-m", "megacov", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_dry_run_prints_plan_and_rejects_bad_layout(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 4, "vocab_size": 67, "hidden_size": 128}))
    path = _write(tmp_path, f"model: {{path: {model}}}\nparallel: {{tp: 2, num_gpus: 0}}\n")
    ok = _megacov("train", path, "--dry-run")
    assert ok.returncode == 0, ok.stderr
    assert "2 x 1 x 1" in ok.stdout and "dry run" in ok.stdout
    bad = _megacov("train", path, "parallel.tp=3", "--dry-run")
    assert bad.returncode == 2
    assert "parallel.tp=3" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    typo = _megacov("train", path, "parallel.tpp=2", "--dry-run")
    assert typo.returncode == 2 and "did you mean 'parallel.tp'" in typo.stderr


def test_doctor_and_unknown_command():
    doctor = _megacov("doctor")
    assert doctor.returncode == 0
    for name in ("torch", "megatron-core", "vllm", "ray", "transformers", "omegaconf", "TransformerEngine",
                 "NVIDIA apex", "GPU count"):
        assert name in doctor.stdout
    assert _megacov("frobnicate").returncode == 2


def test_import_megacov_is_cheap():
    code = ("import sys, megacov, megacov.config, megacov.algorithms, megacov.cli; "
            "heavy = [m for m in ('vllm', 'ray', 'megatron') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
