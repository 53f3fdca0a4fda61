"""The value model: an HF backbone (no LM head) and a linear head giving one value per position.

Column convention as the actor's log-probs (:mod:`megacov.parallel.batch`): ``values[:, t]`` is the
value of the state *before* token t is generated, i.e. the head applied to the hidden state of
position t - 1, so values, log-probs, advantages and the response mask share their columns. Column 0
has no state before it and is 0.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

#: Files of a saved critic (inside a checkpoint's ``critic/`` folder).
WEIGHTS_FILE = "model.safetensors"


class ValueModel(nn.Module):
    def __init__(self, backbone: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(hidden_size, 1)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # Right padding and causal attention: padding after a token never changes its hidden state,
        # so no attention mask is needed (and none means the same kernel for every layout).
        hidden = self.backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        v = self.value_head(hidden).squeeze(-1).float()
        return F.pad(v[:, :-1], (1, 0))


def torch_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def build_value_model(hf_dir: str, *, dtype: torch.dtype, seed: int) -> ValueModel:
    """Backbone weights from ``hf_dir`` (a causal-LM or base-model directory); the head drawn from
    N(0, 1/(hidden+1)^2) with ``seed``, the same on every rank, bias 0."""
    from transformers import AutoModel

    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise FileNotFoundError(f"critic.model_path: no config.json in '{hf_dir}'")
    backbone = AutoModel.from_pretrained(hf_dir, torch_dtype=dtype, attn_implementation="sdpa")
    hidden = int(backbone.config.hidden_size)
    model = ValueModel(backbone, hidden)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.value_head.weight.copy_(torch.randn(1, hidden, generator=gen) / (hidden + 1))
        model.value_head.bias.zero_()
    return model.to(dtype)


def load_weights(model: ValueModel, ckpt_dir: str) -> None:
    """Overwrite every tensor of ``model`` from a saved critic (strict: names and shapes must match)."""
    from safetensors.torch import load_file

    path = os.path.join(ckpt_dir, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{ckpt_dir}: no {WEIGHTS_FILE} (critic checkpoint incomplete)")
    state = load_file(path)
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"{path}: critic tensors differ (missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for name, tensor in own.items():
            if tuple(state[name].shape) != tuple(tensor.shape):
                raise ValueError(f"{path}: {name} has shape {tuple(state[name].shape)}, expected {tuple(tensor.shape)}")
            tensor.copy_(state[name])


def write_json(path: str, obj: object) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
