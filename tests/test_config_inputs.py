"""Bad input found by ``megacov train --dry-run`` before anything starts (ranges of every numeric
setting, the reward function, the data files and their rows, YAML syntax), and the first-hour CLI
conveniences (overrides anywhere, ``--version``, ``megacov config``, a scalar for a list)."""
from __future__ import annotations

import dataclasses
import json
import os
import typing

import pytest

from megacov.cli import main
from megacov.config import ConfigError, MegacovConfig, load_config
from megacov.config.validate import RANGES, check_ranges

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "tiny", "config.yaml")


def _numeric_keys() -> list[str]:
    keys = []
    for section in dataclasses.fields(MegacovConfig):
        cls = type(getattr(MegacovConfig(), section.name))
        if not dataclasses.is_dataclass(cls):
            continue
        for name, hint in typing.get_type_hints(cls).items():
            args = typing.get_args(hint) or (hint,)
            if any(a in (int, float) for a in args) and hint is not bool:
                keys.append(f"{section.name}.{name}")
    return keys


def test_every_numeric_setting_has_a_range():
    missing = sorted(set(_numeric_keys()) - set(RANGES))
    assert not missing, f"numeric settings without a range in config/validate.py: {missing}"
    check_ranges(MegacovConfig())  # the defaults are valid


@pytest.mark.parametrize("override,expected", [
    ("optim.lr=-1e-6", "optim.lr=-1e-06 must be >= 0"),
    ("rollout.temperature=0", "rollout.temperature=0.0 must be > 0"),
    ("trainer.total_steps=0", "trainer.total_steps=0 must be >= 1"),
    ("rollout.top_p=1.5", "rollout.top_p=1.5 must be in (0, 1]"),
    ("rollout.max_response_len=0", "rollout.max_response_len=0 must be >= 1"),
    ("reward.timeout_s=-1", "reward.timeout_s=-1.0 must be > 0"),
    ("reward.workers=-1", "reward.workers=-1 must be >= 0"),
    ("optim.adam_beta2=nan", "optim.adam_beta2=nan must be a finite number"),
    ("trainer.resume=/nowhere/step_1", "trainer.resume='/nowhere/step_1' must be auto, never or an existing"),
])
def test_out_of_range_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        check_ranges(load_config(None, [override]))
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_yaml_syntax_error_names_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: m\nparallel: {tp: 2\nrollout:\n  n: 4\n")
    assert main(["train", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}: line 4, column" in err and "YAML syntax error" in err


def test_scalar_where_a_list_is_expected_is_a_one_element_list(tmp_path):
    cfg = load_config(None, ["data.train_files=x.parquet", "algorithm.par_stage_steps=5"])
    assert cfg.data.train_files == ["x.parquet"] and cfg.algorithm.par_stage_steps == [5]
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  eval_files: e.jsonl\n")
    assert load_config(str(path)).data.eval_files == ["e.jsonl"]


def _dry(*overrides, capsys):
    code = main(["train", TINY, "--dry-run", *overrides])  # overrides after the flag (Hydra habit)
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def test_dry_run_checks_reward_and_data_with_overrides_after_the_flag(tmp_path, capsys):
    code, out, err = _dry("trainer.total_steps=3", capsys=capsys)
    assert code == 0, err
    assert "reward and data OK" in out
    code, _, err = _dry("reward.name=no_such_module:score", capsys=capsys)
    assert code == 2 and "reward.name" in err and "PYTHONPATH" in err and len(err.splitlines()) == 1
    code, _, err = _dry(f"data.train_files={tmp_path}/missing.jsonl", capsys=capsys)
    assert code == 2 and "data.train_files: dataset file not found" in err and "missing.jsonl" in err
    code, _, err = _dry("rollout.temperature=0", capsys=capsys)
    assert code == 2 and "rollout.temperature" in err


def test_non_utf8_row_is_named_by_file_and_row_and_skippable(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    rows = [json.dumps({"prompt": f"q{i}", "answer": str(i)}).encode() for i in range(3)]
    rows.insert(1, b'{"prompt": "caf\xe9", "answer": "1"}')  # latin-1, not UTF-8
    data.write_bytes(b"\n".join(rows) + b"\n")
    code, _, err = _dry(f"data.train_files={data}", capsys=capsys)
    assert code == 2 and f"{data}: row 2: not UTF-8 text" in err and "data.on_bad_row=skip" in err
    code, _, err = _dry(f"data.train_files={data}", "data.on_bad_row=skip", capsys=capsys)
    assert code == 0, err

    from megacov.data import LoadReport, load_prompts

    class _Tok:
        chat_template = None

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) % 50 for c in text]}

    report = LoadReport()
    records = load_prompts([str(data)], _Tok(), prompt_key="prompt", answer_key="answer", max_prompt_len=64,
                           on_bad_row="skip", chat_template=False, report=report)
    assert [r.row for r in records] == [1, 3, 4] and report.bad_rows == 1


def test_version_config_command_and_help_with_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and "megacov 0." in capsys.readouterr().out
    assert main(["config", TINY, "parallel.tp=2", "data.train_files=x.jsonl"]) == 0
    printed = capsys.readouterr().out
    assert "tp: 2" in printed and "- x.jsonl" in printed
    assert main(["config", "trainer.total_steps=7"]) == 0
    assert "total_steps: 7" in capsys.readouterr().out
    assert main(["config", TINY, "rollout.nn=2"]) == 2
    assert "did you mean 'rollout.n'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", "mcore-to-hf", "--help"])
    assert "(default: False)" in capsys.readouterr().out
    from megacov.cli.doctor import run as doctor

    doctor(None)
    assert "megacov" in capsys.readouterr().out.splitlines()[0]
