"""``megacov convert`` and ``megacov verify conversion`` end to end, and their bad-input errors.

The round trips run the real CLI entry point (``megacov.cli.main``): HF -> megatron dist checkpoint
(written by TP x PP gloo processes) -> HF, then compare every tensor bit for bit, load the result in
transformers (and, in the slow test, vLLM), and check the checkpoint at a different layout with
``verify conversion``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from megacov.cli import main


def _tiny(path, **kw) -> str:
    from megacov.tiny import build_model

    defaults = dict(num_layers=4, vocab_size=67, hidden_size=128, num_heads=4, num_kv_heads=2)
    defaults.update(kw)
    return build_model(str(path), **defaults)


def _logits(path: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def _hf_weights(path: str) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def _assert_same_hf_weights(a: str, b: str, dtype=None) -> None:
    wa, wb = _hf_weights(a), _hf_weights(b)
    assert set(wa) == set(wb)
    for name, t in wa.items():
        ref = t.to(dtype) if dtype is not None else t
        assert wb[name].dtype == ref.dtype and torch.equal(wb[name], ref), name


def _no_leftovers(parent) -> None:
    assert not [p for p in os.listdir(parent) if ".tmp-" in p or ".old-" in p]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    return _tiny(tmp_path_factory.mktemp("hf") / "qwen2")


def test_bad_input_is_one_line_and_exit_2(tmp_path, hf_dir, capsys) -> None:
    out = str(tmp_path / "out")
    assert main(["convert", "hf-to-mcore", "--hf", str(tmp_path / "nope"), "--out", out]) == 2
    assert "no such directory" in capsys.readouterr().err
    # unknown architecture: the message lists what is supported
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(hf_dir, gpt2)
    cfg = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps(dict(cfg, architectures=["GPT2LMHeadModel"])))
    assert main(["convert", "hf-to-mcore", "--hf", str(gpt2), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "GPT2LMHeadModel" in err and "Qwen2ForCausalLM" in err and "LlamaForCausalLM" in err
    # config and weights disagree: named tensor, before any process is started
    wrong = tmp_path / "wrong"
    shutil.copytree(hf_dir, wrong)
    (wrong / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=64)))
    assert main(["convert", "hf-to-mcore", "--hf", str(wrong), "--out", out]) == 2
    assert "mlp.gate_proj.weight" in capsys.readouterr().err
    # missing weights file
    (wrong / "model.safetensors").unlink()
    assert main(["convert", "hf-to-mcore", "--hf", str(wrong), "--out", out]) == 2
    assert "no model.safetensors.index.json or model.safetensors" in capsys.readouterr().err
    # a layout the model cannot have
    assert main(["convert", "hf-to-mcore", "--hf", hf_dir, "--out", out, "--tp", "4"]) == 2
    assert "num_key_value_heads=2" in capsys.readouterr().err
    # an HF directory is not an mcore checkpoint; an existing output is not overwritten
    assert main(["convert", "mcore-to-hf", "--mcore", hf_dir, "--out", out]) == 2
    assert "is an HF model directory, not a megatron checkpoint" in capsys.readouterr().err
    trained = tmp_path / "actor"
    trained.mkdir()
    (trained / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    assert main(["convert", "mcore-to-hf", "--mcore", str(trained), "--out", out]) == 2
    assert "--hf" in capsys.readouterr().err  # a training checkpoint needs the HF model it started from
    os.makedirs(out)
    open(os.path.join(out, "keep"), "w").close()
    assert main(["convert", "hf-to-mcore", "--hf", hf_dir, "--out", out]) == 2
    assert "already exists" in capsys.readouterr().err and os.listdir(out) == ["keep"]
    assert main(["verify", "conversion", "--hf", str(tmp_path / "nope")]) == 2
    assert main(["verify", "conversion", "--hf", hf_dir, "--mcore", hf_dir]) == 2
    _no_leftovers(tmp_path)


def _roundtrip(tmp_path, hf: str, tp: int, pp: int, extra: list[str], export_extra: tuple = ()) -> tuple[str, str]:
    ckpt, back = str(tmp_path / "mcore"), str(tmp_path / "back")
    assert main(["convert", "hf-to-mcore", "--hf", hf, "--out", ckpt, "--tp", str(tp), "--pp", str(pp),
                 "--quiet", *extra]) == 0
    meta = json.loads(Path(ckpt, "megacov.json").read_text())
    assert meta["saved_with"] == {"tp": tp, "pp": pp, "ep": 1} and meta["padded_vocab_size"] == 128
    assert meta["hf_config"] == json.loads(Path(hf, "config.json").read_text())
    assert main(["convert", "mcore-to-hf", "--mcore", ckpt, "--out", back, "--quiet", *export_extra]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert Path(hf, name).read_text() == Path(back, name).read_text()
    _no_leftovers(tmp_path)
    return ckpt, back


def test_roundtrip_tied_bf16_and_resharded_verify(tmp_path, capsys) -> None:
    """Tied Llama, stored as bf16 at TP=1 PP=1; exported back exactly; checked at TP=2 with verify."""
    hf = _tiny(tmp_path / "llama", architecture="llama", tie_word_embeddings=True, num_kv_heads=4)
    ckpt, back = _roundtrip(tmp_path, hf, 1, 1, ["--dtype", "bf16"])
    _assert_same_hf_weights(hf, back, dtype=torch.bfloat16)
    assert json.loads(Path(back, "config.json").read_text())["dtype"] == "bfloat16"
    capsys.readouterr()
    # the bf16 checkpoint against the bf16 export, loaded resharded at TP=2 (fp32 compute)
    assert main(["verify", "conversion", "--hf", back, "--mcore", ckpt, "--tp", "2"]) == 0
    line = capsys.readouterr().out
    assert "llama mcore tp=2 pp=1" in line and "conversion OK" in line
    # a corrupt checkpoint fails with a clear error and leaves no output behind
    victim = max(f for f in os.listdir(ckpt) if f.endswith(".distcp"))
    with open(os.path.join(ckpt, victim), "r+b") as fh:
        fh.truncate(100)
    assert main(["convert", "mcore-to-hf", "--mcore", ckpt, "--out", str(tmp_path / "broken"), "--quiet"]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "broken")
    _no_leftovers(tmp_path)


_VLLM_GREEDY = """
import json, os, sys
os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=64, seed=0, disable_log_stats=True)
outs = llm.generate(["12+34=", "(7*8)-"], SamplingParams(temperature=0.0, max_tokens=8, logprobs=1))
print(json.dumps([[o.outputs[0].token_ids, [list(lp.values())[0].logprob for lp in o.outputs[0].logprobs]]
                  for o in outs]))
"""


def _vllm_greedy(path: str) -> list:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _VLLM_GREEDY, path], check=True, capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_roundtrip_tp2_pp2_is_bit_exact_and_loads_in_transformers_and_vllm(tmp_path, hf_dir, capsys) -> None:
    # 1 MB shards: the 1.6 MB model is exported as two shards plus an index
    ckpt, back = _roundtrip(tmp_path, hf_dir, 2, 2, [], ("--max-shard-size-mb", "1"))
    assert sorted(f for f in os.listdir(back) if "safetensors" in f) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    _assert_same_hf_weights(hf_dir, back)
    tokens = torch.randint(0, 67, (2, 20), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(back, tokens), _logits(hf_dir, tokens))
    capsys.readouterr()
    assert main(["verify", "conversion", "--hf", hf_dir, "--mcore", ckpt, "--pp", "2", "--tol", "1e-4"]) == 0
    assert "qwen2 mcore tp=1 pp=2" in capsys.readouterr().out
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM not installed")
    assert _vllm_greedy(back) == _vllm_greedy(hf_dir)  # same tokens and the same log-probs
