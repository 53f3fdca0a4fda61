"""``math``: rule-based correctness of a final answer, checked for equivalence with math-verify.

Extraction comes first and is deliberately conservative: the *last* ``\\boxed{...}`` / ``\\fbox{...}``
(balanced braces, so ``\\boxed{\\frac{1}{2}}`` survives), else a "final answer is X" / "Answer: X" /
GSM8K ``#### X`` phrase, else the last number of the response's final part. Only that extracted string
is given to math-verify, so a response that writes a wrong intermediate result and a right final one
(or the reverse) is scored by what it concluded. Equivalence (``0.5`` vs ``\\frac12``, ``34`` vs
``34.0``, ``x = 2`` vs ``2``) is math-verify's; a plain normalised string match short-cuts it.

math-verify can spend seconds in sympy on adversarial input, so this function is meant to run in the
reward worker pool (:mod:`megacov.rewards.pool`), which kills calls over ``reward.timeout_s``.
"""
from __future__ import annotations

import re
from typing import Optional

#: Only the end of a long response is searched for unanchored answers (the question often contains
#: numbers, and a long derivation contains many).
TAIL_CHARS = 600

_PHRASES = [
    re.compile(r"final answer is[:\s]*\$?([^\n$]+?)\$?\s*(?:\.|$)", re.IGNORECASE | re.MULTILINE),
    re.compile(r"answer is[:\s]*\$?([^\n$]+?)\$?\s*(?:\.|$)", re.IGNORECASE | re.MULTILINE),
    re.compile(r"^\s*answer\s*[:=]\s*\$?([^\n$]+?)\$?\s*$", re.IGNORECASE | re.MULTILINE),
    re.compile(r"####\s*([^\n]+)"),
]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def _last_braced(text: str, command: str) -> Optional[str]:
    """Content of the last ``\\command{...}`` with balanced braces (None if absent or unclosed)."""
    start = text.rfind("\\" + command)
    while start != -1:
        i = start + len(command) + 1
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j].strip()
                j += 1
        start = text.rfind("\\" + command, 0, start)
    return None


def extract_final_answer(response: str) -> Optional[str]:
    """The final answer a response states, or None when it states none."""
    for command in ("boxed", "fbox"):
        found = _last_braced(response, command)
        if found:
            return found
    tail = response[-TAIL_CHARS:]
    for pattern in _PHRASES:
        matches = pattern.findall(tail)
        if matches and matches[-1].strip():
            return matches[-1].strip().rstrip(".")
    numbers = _NUMBER.findall(tail)
    return numbers[-1].replace(",", "") if numbers else None


def _normalise(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace(" ", "")
    return s.rstrip(".").lower()


def _as_latex(s: str) -> str:
    return s if ("$" in s or "\\boxed" in s) else f"${s}$"


def math_reward(response: str, answer: str) -> float:
    """1.0 when the response's final answer is equivalent to ``answer``, else 0.0."""
    pred = extract_final_answer(response)
    if pred is None:
        return 0.0
    if _normalise(pred) == _normalise(answer):
        return 1.0
    from math_verify import parse, verify

    gold_parsed = parse(_as_latex(answer))
    pred_parsed = parse(_as_latex(pred))
    if not gold_parsed or not pred_parsed:
        return 0.0
    return 1.0 if verify(gold_parsed, pred_parsed) else 0.0


def _warmup() -> None:
    """math-verify builds its LaTeX grammar and sympy caches on first use (seconds); reward workers
    call this before taking tasks so that cost never counts against the per-call timeout."""
    math_reward("\\boxed{\\frac{1}{2}}", "0.5")


math_reward.warmup = _warmup  # type: ignore[attr-defined]
