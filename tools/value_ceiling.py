"""How much of the return variance can a critic explain on an exact-answer task?

For a policy (an HF causal-LM directory) and prompts with exact answers (reward 1 when the response
is the answer followed by EOS, as the ``tiny`` reward), the best possible value of the state before
response token t is the probability, under the policy, that the response still ends up exactly
right: 0 once a generated token left the answer, else the product of the policy's probabilities of
the remaining answer tokens and EOS. With gamma = lambda = 1 the returns are the outcome, so this
Bayes-optimal critic's explained variance is the ceiling of ``critic/explained_var`` for that policy
(the first token's ceiling is only the prompt's difficulty: nothing is generated yet).

It also fits ridge regressions of the outcome on what a critic initialised from the policy starts
from: the last hidden state it reads (the value head's input), every layer at the two preceding
positions, and the policy's own log-probs of those tokens; train on the first 80 % of the prompts,
report on the rest. A ceiling far above the probes says the critic must learn new features.

    python tools/value_ceiling.py runs/sft-cache/<key> examples/tiny/data/train.jsonl --prompts 320
"""
from __future__ import annotations

import argparse
import json
import random

import torch


def sample(model, tok, rows, n: int, max_new: int, seed: int):
    """Per sampled response: prompt ids, response ids (to EOS), reward, best value before each token."""
    torch.manual_seed(seed)
    out = []
    for row in rows:
        ids = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        target = tok(row["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids + target])).logits[0].double(), -1)
            p_next = [float(lp[len(ids) - 1 + k, target[k]].exp()) for k in range(len(target))]
            gen = model.generate(torch.tensor([ids] * n), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for resp in gen[:, len(ids):].tolist():
            if tok.eos_token_id in resp:
                resp = resp[:resp.index(tok.eos_token_id) + 1]
            reward = float(resp == target)
            best, on_track = [], True
            for t in range(len(resp)):
                best.append(float(torch.tensor(p_next[t:]).prod()) if on_track and t < len(target) else 0.0)
                on_track = on_track and t < len(target) and resp[t] == target[t]
            out.append((ids, resp, reward, best))
    return out


def ev(returns: torch.Tensor, values: torch.Tensor) -> float:
    return float(1 - (returns - values).var(unbiased=False) / returns.var(unbiased=False))


def probes(model, tok, samples, n_train: int) -> dict[str, float]:
    """Held-out explained variance of ridge fits of the outcome on the critic's starting features."""
    from megacov.trainer.batching import build_actor_batch

    b, _ = build_actor_batch([s[0] for s in samples], [s[1] for s in samples], pad_id=tok.pad_token_id)
    with torch.no_grad():
        o = model(input_ids=b.input_ids, position_ids=b.position_ids, output_hidden_states=True)
    pad = torch.nn.functional.pad
    hidden = torch.cat(o.hidden_states, -1)
    tok_lp = pad(torch.log_softmax(o.logits, -1)[:, :-1].gather(-1, b.input_ids[:, 1:, None]).squeeze(-1), (1, 0))
    h1, h2 = pad(hidden[:, :-1], (0, 0, 1, 0)), pad(hidden[:, :-2], (0, 0, 2, 0))  # positions t-1, t-2
    l1, l2 = pad(tok_lp[:, :-1], (1, 0)), pad(tok_lp[:, :-2], (2, 0))
    logp = torch.stack([l1, l2, l1.exp(), l2.exp()], -1)
    y = torch.tensor([s[2] for s in samples], dtype=torch.float64)[:, None].expand(b.response_mask.shape)
    train, test = b.response_mask.clone(), b.response_mask.clone()
    train[n_train:], test[:n_train] = False, False
    h = model.config.hidden_size
    feats = {"value-head input (last hidden state, t-1)": h1[..., -h:], "all layers at t-1 and t-2": torch.cat([h1, h2], -1),
             "policy log-probs of tokens t-1, t-2": logp}
    out = {}
    for name, x in feats.items():
        x = x.double()
        mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
        a, t = (torch.cat([(x[m] - mu) / sd, torch.ones(int(m.sum()), 1, dtype=torch.float64)], 1)
                for m in (train, test))
        w = torch.linalg.solve(a.T @ a + 10.0 * torch.eye(a.shape[1], dtype=torch.float64), a.T @ y[train])
        out[name] = ev(y[test], t @ w)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("policy", help="HF causal-LM directory (e.g. the warm-start under runs/sft-cache/)")
    ap.add_argument("data", help="JSONL with prompt and answer")
    ap.add_argument("--prompts", type=int, default=320)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt (rollout.n)")
    ap.add_argument("--max-new", type=int, default=6, help="rollout.max_response_len")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(args.policy)
    model = AutoModelForCausalLM.from_pretrained(args.policy, torch_dtype=torch.float32).eval()
    with open(args.data) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    rows = random.Random(args.seed).sample(rows, min(args.prompts, len(rows)))
    samples = sample(model, tok, rows, args.n, args.max_new, args.seed)
    r = torch.tensor([s[2] for s in samples for _ in s[3]], dtype=torch.float64)
    v = torch.tensor([b for s in samples for b in s[3]], dtype=torch.float64)
    first = torch.tensor([t == 0 for s in samples for t in range(len(s[3]))])
    last = torch.tensor([t == len(s[3]) - 1 for s in samples for t in range(len(s[3]))])
    print(f"{len(samples)} responses, reward mean {float(torch.tensor([s[2] for s in samples]).mean()):.3f}")
    print(f"Bayes-optimal critic explained variance: all tokens {ev(r, v):.3f}, first token {ev(r[first], v[first]):.3f}, "
          f"last token {ev(r[last], v[last]):.3f}")
    for name, value in probes(model, tok, samples, n_train=int(0.8 * len(rows)) * args.n).items():
        print(f"ridge probe, held-out explained variance, {name}: {value:.3f}")


if __name__ == "__main__":
    main()
