"""``megacov convert`` when the input does not describe the checkpoint, the output folder is missing,
or the conversion is interrupted: one line, the right exit code, nothing half-written left behind."""
from __future__ import annotations

import json
import os
import shutil
import signal

import pytest

from megacov.cli import main


def _tiny(path, **kw) -> str:
    from megacov.tiny import build_model

    defaults = dict(num_layers=2, vocab_size=67, hidden_size=64, num_heads=4, num_kv_heads=2)
    defaults.update(kw)
    return build_model(str(path), **defaults)


def _leftovers(parent) -> list[str]:
    return [p for p in os.listdir(parent) if ".tmp-" in p or ".old-" in p]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    hf = _tiny(root / "hf")
    ckpt = str(root / "mcore")
    assert main(["convert", "hf-to-mcore", "--hf", hf, "--out", ckpt, "--quiet"]) == 0
    actor = root / "actor"  # what a training checkpoint's actor/ folder looks like: no megacov.json
    shutil.copytree(ckpt, actor)
    (actor / "megacov.json").unlink()
    return {"root": root, "hf": hf, "mcore": ckpt, "actor": str(actor)}


def test_export_creates_parent_folders_and_removes_stale_temps(converted, tmp_path, capsys):
    nested = tmp_path / "x" / "y" / "hf"  # neither x nor y exists
    assert main(["convert", "mcore-to-hf", "--mcore", converted["mcore"], "--out", str(nested), "--quiet"]) == 0
    assert os.path.isfile(nested / "config.json")
    out = tmp_path / "hf"
    os.makedirs(str(out) + ".tmp-killed/part")  # what a conversion killed with SIGKILL leaves
    assert main(["convert", "mcore-to-hf", "--mcore", converted["mcore"], "--out", str(out), "--quiet"]) == 0
    assert "left by an interrupted conversion" in capsys.readouterr().err
    assert _leftovers(tmp_path) == []


def _export_with_hf_config(converted, tmp_path, name, **changes) -> int:
    """mcore-to-hf of the trained actor with ``--hf`` a copy of its HF model whose config has ``changes``."""
    hf = tmp_path / name
    shutil.copytree(converted["hf"], hf)
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(dict(cfg, **changes)))
    return main(["convert", "mcore-to-hf", "--mcore", converted["actor"], "--hf", str(hf),
                 "--out", str(tmp_path / "out"), "--quiet"])


def test_config_that_does_not_fit_the_weights_is_one_line_exit_2(converted, tmp_path, capsys):
    code = _export_with_hf_config(converted, tmp_path, "wrong", intermediate_size=96)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "linear_fc1" in err and ("does not fit" in err or "expects" in err)
    assert not os.path.exists(tmp_path / "out") and _leftovers(tmp_path) == []


def test_smaller_vocab_in_hf_config_is_refused_not_cut(converted, tmp_path, capsys):
    code = _export_with_hf_config(converted, tmp_path, "small", vocab_size=60)
    err = capsys.readouterr().err
    assert code == 2 and "vocab_size=60" in err and "not padding" in err
    # the right HF model: rows past its vocabulary are megatron's zero padding and are dropped
    assert main(["convert", "mcore-to-hf", "--mcore", converted["actor"], "--hf", converted["hf"],
                 "--out", str(tmp_path / "ok"), "--quiet"]) == 0


def test_sigterm_during_export_leaves_no_temp_folder(converted, tmp_path, monkeypatch, capsys):
    from megacov.models import hf_io

    real_add = hf_io.ShardWriter.add_bytes
    calls = {"n": 0}

    def add_then_term(self, name, chunks):
        real_add(self, name, chunks)
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # preempted mid-conversion, with the reader's thread running

    monkeypatch.setattr(hf_io.ShardWriter, "add_bytes", add_then_term)
    code = main(["convert", "mcore-to-hf", "--mcore", converted["mcore"], "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 143 and "interrupted" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is not None


def test_verify_conversion_in_bf16_passes_a_right_conversion_and_fails_a_wrong_one(converted, tmp_path, capsys):
    """bf16's tolerance is measured from the HF model's own bf16 rounding, not fp32's 1e-4."""
    args = ["verify", "conversion", "--hf", converted["hf"], "--dtype", "bf16"]
    assert main([*args, "--mcore", converted["mcore"]]) == 0, capsys.readouterr()
    assert "conversion OK" in capsys.readouterr().out
    other = _tiny(tmp_path / "other", seed=1)  # same shapes, other weights: a wrong conversion
    wrong = str(tmp_path / "wrong")
    assert main(["convert", "hf-to-mcore", "--hf", other, "--out", wrong, "--quiet"]) == 0
    assert main([*args, "--mcore", wrong]) == 1
    assert "FAILED" in capsys.readouterr().out
