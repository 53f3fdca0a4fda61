"""``judge``: a model-based soft reward (generative verifier in the style of arXiv 2503.23829).

A judge model, served by its own vLLM engine, reads the question, the reference answer and the final
part of the response, and is asked for a verdict. Instead of sampling the verdict, both verdict words
are *scored* (one prompt-log-prob pass per candidate, prefix-cached), which makes the reward
deterministic and gives the soft value directly:

* ``soft``: P(correct) / (P(correct) + P(incorrect)) -- the judge's probability of the "correct" verdict
  given that it answers with a verdict (probability mass on other tokens is formatting, not doubt);
* ``binary``: 1 when "correct" is the likelier of the two verdicts (the argmax verdict), else 0.

Only the first token of each verdict word (``reward.judge_verdicts``, default YES / NO as the released
judge uses) is scored, so the two words must start with different tokens; this is checked at start.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from megacov.rewards.pool import Outcome, RewardSpecError

#: Characters of the response shown to the judge (its final part: the conclusion, not the derivation).
RESPONSE_TAIL_CHARS = 1500

TEMPLATE = ("Judge whether the response reaches the reference answer.\n"
            "Question: {question}\nReference answer: {answer}\nResponse (final part): {response}\n"
            "Is the response correct? Answer {yes} or {no}: ")


class JudgeReward:
    """Scores responses with ``engines`` (a :class:`~megacov.rollout.engine.RolloutEngines` of the judge)."""

    def __init__(self, engines: Any, tokenizer: Any, *, mode: str, verdicts: Sequence[str]) -> None:
        if mode not in ("soft", "binary"):
            raise RewardSpecError(f"reward.judge_mode='{mode}' must be 'soft' or 'binary'")
        if len(verdicts) != 2:
            raise RewardSpecError(f"reward.judge_verdicts needs two words (correct, incorrect), got {list(verdicts)}")
        self.engines, self.tokenizer, self.mode = engines, tokenizer, mode
        self.words = [str(v) for v in verdicts]
        ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in self.words]
        if not ids[0] or not ids[1] or ids[0][0] == ids[1][0]:
            raise RewardSpecError(f"reward.judge_verdicts {self.words} must start with different tokens of the "
                                  f"judge's tokenizer (first tokens: {[i[:1] for i in ids]})")
        self.yes_id, self.no_id = int(ids[0][0]), int(ids[1][0])
        self.templated = bool(getattr(tokenizer, "chat_template", None))

    def prompt_ids(self, response: str, answer: str, question: str) -> list[int]:
        text = TEMPLATE.format(question=question, answer=answer, response=response[-RESPONSE_TAIL_CHARS:],
                               yes=self.words[0], no=self.words[1])
        if self.templated:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                      add_generation_prompt=True, tokenize=False)
        return [int(t) for t in self.tokenizer(text, add_special_tokens=not self.templated)["input_ids"]]

    def score(self, responses: Sequence[str], answers: Sequence[str], questions: Sequence[str]) -> list[Outcome]:
        prompts = [self.prompt_ids(r, a, q) for r, a, q in zip(responses, answers, questions)]
        seqs = [p + [tok] for p in prompts for tok in (self.yes_id, self.no_id)]
        try:
            logprobs = self.engines.score(seqs)
        except Exception as exc:  # noqa: BLE001 - a failed judge call scores the batch 0, counted
            return [Outcome(0.0, "error", f"judge failed: {exc}"[:300]) for _ in prompts]
        out = []
        for i in range(len(prompts)):
            lp_yes, lp_no = logprobs[2 * i][-1], logprobs[2 * i + 1][-1]
            out.append(Outcome(self.reward(lp_yes, lp_no), "ok"))
        return out

    def reward(self, lp_yes: float, lp_no: float) -> float:
        if self.mode == "binary":
            return 1.0 if lp_yes > lp_no else 0.0
        top = max(lp_yes, lp_no)
        p_yes, p_no = math.exp(lp_yes - top), math.exp(lp_no - top)
        return p_yes / (p_yes + p_no)
