"""The embedded CPU default: a tiny Qwen2-style model, a character-level tokenizer and a small task.

Everything here is generated locally (no hub downloads), so the demo and every CPU test run on a
fresh machine without network. The model keeps head_dim = 32 because vLLM's CPU attention rejects
smaller heads; the vocabulary has 64 symbols, which Megatron pads to 128 (``model.vocab_divisible_by``),
so under tensor parallelism the padded vocabulary rows are always exercised (at TP=2 one shard holds
only padding).
"""
from __future__ import annotations

import json
import os
import random
import string
from typing import Optional

# Special tokens first so their ids are stable; then every printable character the task needs.
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|bos|>"]
CHARS = list(string.digits + string.ascii_lowercase + " +-*=?:.,()[]{}<>|/\\_#'\"!")


def build_tokenizer(out_dir: Optional[str] = None):
    """A character-level ``PreTrainedTokenizerFast``: one token per character, EOS = <|endoftext|>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>", bos_token="<|bos|>",
        unk_token="?", model_max_length=512, clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


def _save_quietly(model, tokenizer, out_dir: str) -> None:
    """Save without transformers' progress bar, so a command that builds the example on first use
    keeps stderr for its own one-line messages."""
    from transformers.utils import logging as hf_logging

    os.makedirs(out_dir, exist_ok=True)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def tiny_vocab_size() -> int:
    return len(SPECIAL_TOKENS) + len(CHARS)


def build_model(
    out_dir: str,
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    num_heads: int = 2,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
    architecture: str = "qwen2",
    seed: int = 0,
    vocab_size: Optional[int] = None,
) -> str:
    """Write a randomly initialised HF model + the char tokenizer to ``out_dir`` (fp32 safetensors).

    ``architecture`` picks the family (qwen2, llama, qwen3, mistral) so the conversion tests can build
    a tiny model of each. Returns ``out_dir``.
    """
    import torch
    import transformers

    tokenizer = build_tokenizer()
    vocab = vocab_size or len(tokenizer)
    common = dict(
        vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )
    classes = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                  {"head_dim": hidden_size // num_heads}),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    }
    if architecture not in classes:
        raise ValueError(f"unknown tiny architecture '{architecture}' (choose from {', '.join(classes)})")
    cfg_cls, model_cls, extra = classes[architecture]
    torch.manual_seed(seed)
    config = cfg_cls(**common, **extra)
    model = model_cls(config).to(torch.float32)
    # Larger-than-default init so that a random tiny model is not almost uniform (entropy would then
    # sit at log(V) and the covariance statistics would be degenerate).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
    _save_quietly(model, tokenizer, out_dir)
    return out_dir


def build_moe_model(
    out_dir: str,
    *,
    num_layers: int = 3,
    hidden_size: int = 64,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 96,
    moe_intermediate_size: int = 32,
    num_experts: int = 8,
    top_k: int = 2,
    norm_topk_prob: bool = True,
    mlp_only_layers: tuple[int, ...] = (1,),
    decoder_sparse_step: int = 1,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    vocab_size: Optional[int] = None,
) -> str:
    """Write a randomly initialised HF ``Qwen3MoeForCausalLM`` + the char tokenizer (fp32 safetensors).

    Built with transformers' own ``Qwen3MoeConfig``; by default layer 1 keeps a dense MLP
    (``mlp_only_layers``), so both kinds of layer are exercised. head_dim stays 32 for vLLM's CPU
    attention. The router weights get the same larger-than-default init as the rest, so that tokens
    really spread over the experts. Returns ``out_dir``.
    """
    import torch
    import transformers

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = transformers.Qwen3MoeConfig(
        vocab_size=vocab_size or len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        moe_intermediate_size=moe_intermediate_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=hidden_size // num_heads, num_experts=num_experts,
        num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob, mlp_only_layers=list(mlp_only_layers),
        decoder_sparse_step=decoder_sparse_step, max_position_embeddings=512, rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )
    model = transformers.Qwen3MoeForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    _save_quietly(model, tokenizer, out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------
# The tiny reasoning task: two-digit addition with an exact answer.
# --------------------------------------------------------------------------------------------


def make_problem(rng: random.Random) -> dict:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return {"prompt": f"{a}+{b}=", "answer": str(a + b)}


def write_task_data(out_dir: str, n_train: int = 512, n_eval: int = 64, seed: int = 0) -> dict:
    """Write ``train.jsonl`` and ``eval.jsonl`` with disjoint problems. Returns their paths."""
    rng = random.Random(seed)
    seen: set = set()
    rows = []
    while len(rows) < n_train + n_eval:
        row = make_problem(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, part in (("train", rows[:n_train]), ("eval", rows[n_train:])):
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        with open(paths[name], "w") as fh:
            for row in part:
                fh.write(json.dumps(row) + "\n")
    return paths


# --------------------------------------------------------------------------------------------
# The embedded example (examples/tiny): generated on first use.
# --------------------------------------------------------------------------------------------

#: Model and task sizes of examples/tiny (the demo and the end-to-end tests use these).
EXAMPLE_MODEL = dict(num_layers=4, hidden_size=64, num_heads=2, num_kv_heads=2, intermediate_size=128)
EXAMPLE_DATA = dict(n_train=1024, n_eval=64, n_sft=1024)
#: The mixture-of-experts policy of examples/tiny/moe.yaml (``examples/tiny/moe-model``).
EXAMPLE_MOE_MODEL = dict(num_layers=3, hidden_size=64, num_experts=8, top_k=2, mlp_only_layers=(1,))


def build_example(model_dir: str, data_dir: str, seed: int = 0) -> dict:
    """Write the tiny model and the train / eval / warm-start data of examples/tiny (idempotent).

    The warm-start problems are disjoint from the RL training and eval problems, so RL is measured on
    prompts the warm-start never saw.
    """
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        build_model(model_dir, seed=seed, **EXAMPLE_MODEL)
    names = ("train", "eval", "sft")
    paths = {name: os.path.join(data_dir, f"{name}.jsonl") for name in names}
    if not all(os.path.isfile(p) for p in paths.values()):
        rng = random.Random(seed)
        seen: set = set()
        rows = []
        total = EXAMPLE_DATA["n_train"] + EXAMPLE_DATA["n_eval"] + EXAMPLE_DATA["n_sft"]
        while len(rows) < total:
            row = make_problem(rng)
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                rows.append(row)
        os.makedirs(data_dir, exist_ok=True)
        bounds = {"train": (0, EXAMPLE_DATA["n_train"]),
                  "eval": (EXAMPLE_DATA["n_train"], EXAMPLE_DATA["n_train"] + EXAMPLE_DATA["n_eval"]),
                  "sft": (EXAMPLE_DATA["n_train"] + EXAMPLE_DATA["n_eval"], total)}
        for name, (lo, hi) in bounds.items():
            tmp = paths[name] + ".tmp"
            with open(tmp, "w") as fh:
                for row in rows[lo:hi]:
                    fh.write(json.dumps(row) + "\n")
            os.replace(tmp, paths[name])
    return {"model": model_dir, **paths}


def _in_example(path: str) -> Optional[str]:
    """The examples/tiny folder ``path`` points into, if any."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] == "tiny" and parts[i - 1] == "examples":
            return os.sep.join(parts[: i + 1]) or os.sep
    return None


def prepare_example(cfg) -> bool:
    """Generate examples/tiny's model and data when the config points at them and they are missing.

    Returns True when something was generated. Paths outside examples/tiny are never touched, so a
    typo in a real model path still fails with its own clear error.
    """
    paths = [cfg.model.path, *cfg.data.train_files, *cfg.data.eval_files, *cfg.data.sft_files]
    missing = [p for p in paths if not os.path.exists(p) and _in_example(p)]
    if not missing:
        return False
    root = _in_example(missing[0])
    build_example(os.path.join(root, "model"), os.path.join(root, "data"))
    moe_dir = os.path.join(root, "moe-model")
    if any(os.path.abspath(p) == os.path.abspath(moe_dir) for p in missing):
        build_moe_model(moe_dir, seed=0, **EXAMPLE_MOE_MODEL)
    return True
