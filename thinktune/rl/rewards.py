"""Rewards: score sampled completions against reference answers, one named component at a time.

Built-in components (each a float per completion):
- `format`: the share of three checks a completion passes: it closes `</think>`, gives a non-empty answer
  after it, and stops at EOS (1.0 = all three; the "format rate" counts completions at 1.0).
- `accuracy`: 1.0 when the answer matches the reference, else 0.0. A reference that is a number (with an
  optional unit) is matched numerically against the answer's first number within `rl.numeric_tolerance`
  (relative); a reference that is a multiple-choice letter (A-J) against the answer's chosen letter;
  any other reference by normalised exact match: the normalised reference (lower case, no punctuation,
  no articles, single spaces; SQuAD's normalisation, possessive 's dropped) equals the normalised answer or occurs in it as
  a run of whole words.
- `f1`: SQuAD's token F1 between the normalised answer and reference (partial credit).
- `length`: 0 while the thinking stays within `rl.max_thinking_tokens`, then falls linearly to -1 at
  twice the budget (a completion that never closes `</think>` counts all its tokens as thinking).
User components: `module:function`, called as `function(prompt, completion, reference, **row) -> float`
with the completion's decoded text and the problem row's other columns.

The reward of a completion is the weighted sum of its components (`rl.reward_weights`). This module
works on decoded text and token counts only; it never touches a model or a tensor.
"""
from __future__ import annotations

import collections
import importlib
import math
import re
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from thinktune.config import REWARD_NAMES, RLConfig
from thinktune.errors import UserError


@dataclass
class Completion:
    """One sampled completion, decoded and split at `</think>`."""

    prompt: str
    text: str
    thinking: str
    answer: str
    closed_think: bool
    stopped_at_eos: bool
    num_tokens: int
    thinking_tokens: int


@dataclass
class Scores:
    """Per-completion rewards: each component by name, and their weighted sum."""

    components: dict[str, list[float]] = field(default_factory=dict)
    total: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------- answer matching

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_POSSESSIVE = re.compile(r"['\u2019]s\b")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_NUMERIC_REFERENCE = re.compile(r"\s*([-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+)\s*(%|[^\W\d_][\w/%.^]*)?\s*\.?\s*")
_LETTER_REFERENCE = re.compile(r"\s*\(?([A-J])\)?(?:[.:)]\s*.*)?\s*", re.DOTALL)
_LETTER_IN_ANSWER = [
    re.compile(r"\banswer(?:\s+is)?\s*[:\-]?\s*\(?([A-J])\)?(?![\w])"),
    re.compile(r"^\s*\(?([A-J])(?:[.:)]|\s*$)"),
    re.compile(r"\(([A-J])\)"),
    re.compile(r"\boption\s+([A-J])\b", re.IGNORECASE),
]


def normalize_text(text: str) -> str:
    """SQuAD's answer normalisation (lower case, no punctuation, no articles, single spaces), and a possessive
    's dropped first so that "Graves' disease", "Graves's disease" and "Graves disease" agree."""
    text = _POSSESSIVE.sub("", text.lower())
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token-level F1 between two answers after `normalize_text`."""
    pred, ref = normalize_text(prediction).split(), normalize_text(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def parse_number(text: str) -> float | None:
    """The first number in `text` ('1,200' -> 1200.0), or None."""
    found = _NUMBER.search(text)
    return float(found.group(0).replace(",", "")) if found else None


def numeric_reference(reference: str) -> float | None:
    """The reference's value when the whole reference is one number with an optional unit ('5 mg', '0.9%')."""
    found = _NUMERIC_REFERENCE.fullmatch(reference)
    return float(found.group(1).replace(",", "")) if found else None


def choice_letter(text: str) -> str | None:
    """The multiple-choice letter an answer picks ('The answer is C', '(B) ...', 'D. Aspirin'), or None."""
    for pattern in _LETTER_IN_ANSWER:
        found = pattern.search(text)
        if found:
            return found.group(1).upper()
    return None


def letter_reference(reference: str) -> str | None:
    """The reference's letter when the reference is a choice ('B', '(B)', 'B. Aspirin'), or None."""
    found = _LETTER_REFERENCE.fullmatch(reference)
    return found.group(1) if found else None


def contains_words(answer: str, reference: str) -> bool:
    """Normalised exact match: the normalised reference equals the answer or is a run of its whole words."""
    ans, ref = normalize_text(answer).split(), normalize_text(reference).split()
    if not ref:
        return False
    return any(ans[i: i + len(ref)] == ref for i in range(len(ans) - len(ref) + 1))


def answer_matches(answer: str, reference: str, tolerance: float = 0.01) -> bool:
    """Whether `answer` gives the `reference` answer: numerically, by choice letter, or by normalised text."""
    if not answer.strip():
        return False
    value = numeric_reference(reference)
    if value is not None:
        got = parse_number(answer)
        return got is not None and math.isclose(got, value, rel_tol=tolerance, abs_tol=1e-12)
    letter = letter_reference(reference)
    if letter is not None:
        return choice_letter(answer) == letter
    return contains_words(answer, reference)


# ----------------------------------------------------------------------------- components

def format_reward(completion: Completion) -> float:
    """The share of the three format checks passed: closes </think>, non-empty answer, stops at EOS."""
    checks = (completion.closed_think, bool(completion.answer.strip()), completion.stopped_at_eos)
    return sum(checks) / 3.0


def length_reward(completion: Completion, max_thinking_tokens: int) -> float:
    """0 within the thinking budget, then -1 x the overshoot as a fraction of the budget (floored at -1)."""
    over = completion.thinking_tokens - max_thinking_tokens
    return 0.0 if over <= 0 else -min(1.0, over / max_thinking_tokens)


RewardFn = Callable[[Completion, str, dict[str, Any]], float]


def load_user_reward(spec: str, index: int) -> Callable[..., float]:
    """Import 'package.module:function' (the function a user wrote), or say what is wrong with it."""
    module_name, _, attr = spec.partition(":")
    key = f"rl.rewards[{index}] = {spec!r}"
    if not module_name or not attr:
        raise UserError(f"{key} is not 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{key}: module {module_name} cannot be imported ({exc}); put it on PYTHONPATH") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{key}: {module_name} has no function {attr}")
    return fn


def _extra(row: dict[str, Any]) -> dict[str, Any]:
    """A row's columns as keyword arguments, without those that would clash with the three positional ones."""
    return {k: v for k, v in row.items() if k not in ("prompt", "completion", "reference") and k.isidentifier()}


def build_rewards(cfg: RLConfig) -> list[tuple[str, float, RewardFn]]:
    """(name, weight, function of (completion, reference, row)) for each entry of rl.rewards."""
    weights = cfg.reward_weights or [1.0] * len(cfg.rewards)
    built: list[tuple[str, float, RewardFn]] = []
    for index, (name, weight) in enumerate(zip(cfg.rewards, weights)):
        if name == "format":
            fn: RewardFn = lambda c, ref, row: format_reward(c)  # noqa: E731
        elif name == "accuracy":
            fn = lambda c, ref, row, tol=cfg.numeric_tolerance: float(answer_matches(c.answer, ref, tol))  # noqa: E731
        elif name == "f1":
            fn = lambda c, ref, row: token_f1(c.answer, ref)  # noqa: E731
        elif name == "length":
            fn = lambda c, ref, row, budget=cfg.max_thinking_tokens: length_reward(c, budget)  # noqa: E731
        elif ":" in name:
            user = load_user_reward(name, index)
            fn = lambda c, ref, row, user=user: user(c.prompt, c.text, ref, **_extra(row))  # noqa: E731
        else:  # the config already refused it; kept for callers that build an RLConfig by hand
            raise UserError(f"rl.rewards[{index}] = {name!r} is not one of {', '.join(REWARD_NAMES)} nor 'module:function'")
        built.append((name, float(weight), fn))
    return built


def score(completions: Sequence[Completion], references: Sequence[str], rows: Sequence[dict[str, Any]],
          rewards: list[tuple[str, float, RewardFn]]) -> Scores:
    """Every component for every completion, and the weighted total."""
    scores = Scores()
    totals = [0.0] * len(completions)
    for name, weight, fn in rewards:
        values = []
        for i, (completion, reference, row) in enumerate(zip(completions, references, rows)):
            value = fn(completion, reference, row)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"reward {name} returned {value!r} for completion {i} (question "
                                f"{completion.prompt[-80:]!r}); a reward must return a finite number")
            values.append(float(value))
            totals[i] += weight * float(value)
        scores.components[name] = values
    scores.total = totals
    return scores
