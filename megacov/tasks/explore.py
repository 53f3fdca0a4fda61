"""``explore``: an embedded task where keeping entropy pays, so entropy collapse is visible and costly.

A prompt ``c9=`` asks for eight digits that sum to 9. Any such string earns partial credit (0.3);
one that also contains the prompt key's hidden *bonus string* (here, say, ``31``) earns full credit
(1.0). Bonus strings come in two kinds, like the easy and hard problems of a benchmark:

* *common* ones (``111``, ``222``, ``00``): a fifth to a third of the warm-start's valid strings
  hold them, so sharpening alone raises the full-credit rate of their keys -- every method's
  accuracy rises as its entropy falls;
* *rare* ones (``31``, ``13``, ``30``): they contain the digit 3, which the warm-start emits
  rarely (a few percent of its valid strings hold one), so they are found only by a policy that
  keeps sampling away from its favourite strings.

So:

* many correct behaviours per prompt (hundreds of digit strings sum to each target);
* eight decision tokens per response, plus EOS;
* a diverse but imperfect warm-start: SFT on random valid strings drawn from a skewed digit
  distribution, a fifth of them deliberately off by one, so the policy starts with high entropy,
  a moderate hit rate on the sum and a full-credit rate well below 1%;
* recurring prompts: 6 keys x 7 targets in training, each seen every few steps, and 18 held-out
  (key, target) pairs for evaluation, so a bonus found on one target of a key transfers to the others;
* a payoff for exploration: policy-gradient sharpening drives the policy onto a few common strings
  per prompt (entropy collapse); once there, a rare bonus is never sampled again and the reward of
  its keys stalls at the partial credit. Methods that keep entropy keep finding rare bonuses.

``correct`` (``reward/acc``, ``val/acc``) means full credit, since partial credit (0.3) is below the
rewards module's threshold of 0.5: the valid sum is the format, the bonus the answer. The demo's
validation figure is ``val/score``, the mean held-out reward, so both count: validity, which every
method learns by sharpening, and the bonus of a key, which transfers to its held-out targets.
Partial credit is low so that the bonus dominates the reward: at 0.6 the policy gradient was
mostly about validity and every method's full-credit rate stayed near zero.

Everything is generated from a seed; nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field

#: Number of digits in a response (the decision tokens; EOS follows).
RESPONSE_DIGITS = 8
PARTIAL_CREDIT = 0.3
#: Written beside the data: the spec it was generated from (data from another spec is regenerated).
SPEC_FILE = "spec.json"
FULL_CREDIT = 1.0


@dataclass(frozen=True)
class ExploreSpec:
    """Everything that determines the generated data (part of the warm-start cache key via the files)."""

    keys: str = "abcdef"
    targets: tuple[int, ...] = (6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
    eval_targets_per_key: int = 3
    #: Warm-start digit distribution for 0, 1, 2, 3 (other digits never appear in the warm-start data).
    digit_weights: tuple[float, ...] = (0.30, 0.40, 0.285, 0.015)
    #: Bonus strings, one per key (a seeded assignment): common ones that sharpening finds, and
    #: rare ones holding the digit 3 that only exploration finds.
    bonus_strings: tuple[str, ...] = ("111", "222", "00", "31", "13", "30")
    sft_rows_per_prompt: int = 48
    #: Share of warm-start examples with one digit moved by +-1 (a wrong sum): the imperfection.
    sft_noise: float = 0.2
    seed: int = 0
    bonus: dict = field(default_factory=dict)


def parse_answer(answer: str) -> tuple[int, str]:
    """``"9|31"`` -> (9, "31"): the target sum and the bonus string."""
    target, _, bonus = answer.strip().partition("|")
    return int(target), bonus


def explore_score(response: str, answer: str) -> float:
    """0 unless ``response`` is exactly eight digits summing to the target; then 0.6, or 1.0 with the bonus."""
    target, bonus = parse_answer(answer)
    text = response.strip()
    if len(text) != RESPONSE_DIGITS or not text.isdigit() or sum(int(c) for c in text) != target:
        return 0.0
    return FULL_CREDIT if bonus and bonus in text else PARTIAL_CREDIT


def bonus_strings(spec: ExploreSpec) -> dict[str, str]:
    """The hidden bonus string of every key (a seeded assignment of ``spec.bonus_strings``)."""
    pairs = list(spec.bonus_strings)
    random.Random(spec.seed + 17).shuffle(pairs)
    return {k: pairs[i % len(pairs)] for i, k in enumerate(spec.keys)}


def split_prompts(spec: ExploreSpec) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, eval) (key, target) pairs: every key keeps ``eval_targets_per_key`` targets for eval."""
    rng = random.Random(spec.seed + 29)
    train, held = [], []
    for key in spec.keys:
        targets = list(spec.targets)
        rng.shuffle(targets)
        held += [(key, t) for t in sorted(targets[:spec.eval_targets_per_key])]
        train += [(key, t) for t in sorted(targets[spec.eval_targets_per_key:])]
    return train, held


def sample_valid(target: int, rng: random.Random, weights: tuple[float, ...]) -> str:
    """A random string of ``RESPONSE_DIGITS`` digits drawn from ``weights`` with the given sum."""
    digits = list(range(len(weights)))
    if not 0 <= target <= RESPONSE_DIGITS * (len(weights) - 1):
        raise ValueError(f"target {target} is out of reach with digits 0..{len(weights) - 1}")
    while True:
        s = rng.choices(digits, weights=weights, k=RESPONSE_DIGITS)
        if sum(s) == target:
            return "".join(map(str, s))


def _perturb(text: str, rng: random.Random) -> str:
    """One digit moved by +-1 (staying a digit), so the sum is off by one."""
    i = rng.randrange(len(text))
    d = int(text[i])
    d = d + 1 if d == 0 else d - 1 if d == 9 else d + rng.choice((-1, 1))
    return text[:i] + str(d) + text[i + 1:]


def prompt_text(key: str, target: int) -> str:
    return f"{key}{target}="


def task_rows(spec: ExploreSpec) -> dict[str, list[dict]]:
    """The ``train``, ``eval`` and ``sft`` rows (JSON-ready). SFT rows' answer is the response itself."""
    bonus = bonus_strings(spec)
    train, held = split_prompts(spec)
    rng = random.Random(spec.seed + 41)
    rows: dict[str, list[dict]] = {
        "train": [{"prompt": prompt_text(k, t), "answer": f"{t}|{bonus[k]}"} for k, t in train],
        "eval": [{"prompt": prompt_text(k, t), "answer": f"{t}|{bonus[k]}"} for k, t in held],
        "sft": [],
    }
    for key, target in train + held:
        for _ in range(spec.sft_rows_per_prompt):
            text = sample_valid(target, rng, spec.digit_weights)
            if rng.random() < spec.sft_noise:
                text = _perturb(text, rng)
            rows["sft"].append({"prompt": prompt_text(key, target), "answer": text})
    rng.shuffle(rows["sft"])
    return rows


def write_explore_data(data_dir: str, spec: ExploreSpec | None = None) -> dict[str, str]:
    """Write ``{train,eval,sft}.jsonl`` into ``data_dir`` (atomically, idempotently). Returns their paths."""
    spec = spec or ExploreSpec()
    paths = {name: os.path.join(data_dir, f"{name}.jsonl") for name in ("train", "eval", "sft")}
    stamp_path = os.path.join(data_dir, SPEC_FILE)
    stamp = json.dumps(asdict(spec), sort_keys=True)
    if all(os.path.isfile(p) for p in paths.values()) and _read(stamp_path) == stamp:
        return paths
    # Missing files, or files written from another spec (an older version of the task): data that
    # does not match the code would make the demo measure a task nobody can regenerate.
    os.makedirs(data_dir, exist_ok=True)
    for name, rows in task_rows(spec).items():
        tmp = paths[name] + ".tmp"
        with open(tmp, "w") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows)
        os.replace(tmp, paths[name])
    with open(stamp_path + ".tmp", "w") as fh:
        fh.write(stamp)
    os.replace(stamp_path + ".tmp", stamp_path)
    return paths


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def build_explore_example(model_dir: str, data_dir: str, spec: ExploreSpec | None = None) -> dict[str, str]:
    """The tiny model (same size as examples/tiny) and the explore data; existing files are kept."""
    from megacov.tiny import EXAMPLE_MODEL, build_model

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        build_model(model_dir, seed=(spec or ExploreSpec()).seed, **EXAMPLE_MODEL)
    return {"model": model_dir, **write_explore_data(data_dir, spec)}


def warm_start_rates(spec: ExploreSpec | None = None, samples: int = 20000, seed: int = 1) -> dict[str, float]:
    """What a policy equal to the warm-start *data* would score: the ideal SFT, for the docs and tests.

    ``valid`` and ``full`` over all training prompts, and ``full/<bonus>`` over the prompts of the
    key whose bonus string that is. The trained warm-start is worse at the sum (a tiny model) and
    so has fewer valid answers.
    """
    spec = spec or ExploreSpec()
    rng = random.Random(seed)
    rows = task_rows(spec)
    answers = {r["prompt"]: r["answer"] for r in rows["train"]}
    sft = [r for r in rows["sft"] if r["prompt"] in answers]
    picked = rng.choices(sft, k=samples)
    scores = [explore_score(r["answer"], answers[r["prompt"]]) for r in picked]
    out = {"valid": sum(s > 0 for s in scores) / samples, "full": sum(s == FULL_CREDIT for s in scores) / samples}
    for bonus in sorted(set(bonus_strings(spec).values())):
        mine = [s for r, s in zip(picked, scores) if parse_answer(answers[r["prompt"]])[1] == bonus]
        out[f"full/{bonus}"] = sum(s == FULL_CREDIT for s in mine) / max(len(mine), 1)
    return out
