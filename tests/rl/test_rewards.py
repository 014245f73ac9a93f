"""Rewards: each built-in component, answer matching rules, user rewards, bad rewards."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from thinktune.config import RLConfig
from thinktune.errors import UserError
from thinktune.rl.rewards import (Completion, answer_matches, build_rewards, choice_letter, format_reward,
                                  length_reward, normalize_text, score, token_f1)


def completion(answer: str = "Metformin.", closed: bool = True, stopped: bool = True, thinking_tokens: int = 10,
               text: str | None = None) -> Completion:
    body = text if text is not None else f"thinking\n</think>\n{answer}"
    return Completion("prompt", body, "thinking", answer, closed, stopped, 20, thinking_tokens)


def test_format_reward_counts_each_check():
    assert format_reward(completion()) == 1.0
    assert format_reward(completion(stopped=False)) == pytest.approx(2 / 3)
    assert format_reward(completion(answer="  ")) == pytest.approx(2 / 3)
    assert format_reward(completion(answer="", closed=False, stopped=False)) == 0.0


@pytest.mark.parametrize("answer, reference, expected", [
    ("The right coronary artery is most likely occluded.", "Right coronary artery", True),
    ("Right coronary artery", "right coronary artery.", True),
    ("The left anterior descending artery.", "Right coronary artery", False),
    ("coronary", "Right coronary artery", False),                   # part of the reference is not a match
    ("Arteryitis", "artery", False),                                 # whole words only
    ("The dose is 1,000 mg per day.", "1000 mg", True),             # numeric: first number, commas, units ignored
    ("About 7.45", "7.4", False),                                   # 0.7% off, at the 0.1% tolerance below
    ("The answer is C.", "C", True),
    ("(B) Aspirin", "B. Aspirin", True),
    ("D. Heparin", "B", False),
    ("", "Metformin", False),
])
def test_answer_matching(answer: str, reference: str, expected: bool):
    tolerance = 0.001 if reference == "7.4" else 0.01
    assert answer_matches(answer, reference, tolerance) is expected


def test_numeric_tolerance_is_relative():
    assert answer_matches("7.45", "7.4", 0.01) and not answer_matches("7.6", "7.4", 0.01)
    assert answer_matches("-0.5", "-.5") and not answer_matches("no number", "5")


def test_normalize_and_f1_follow_squad():
    assert normalize_text("The  Right-coronary, artery!") == "rightcoronary artery"
    assert token_f1("the right coronary artery", "Right coronary artery") == 1.0
    # SQuAD: prediction 'left coronary artery' vs 'right coronary artery': 2 common of 3 and 3 -> F1 2/3
    assert token_f1("left coronary artery", "right coronary artery") == pytest.approx(2 / 3)
    assert token_f1("", "x") == 0.0 and token_f1("", "") == 1.0


def test_choice_letter_patterns():
    assert choice_letter("The answer is (D)") == "D"
    assert choice_letter("B. because ...") == "B"
    assert choice_letter("I would choose option e") == "E"
    assert choice_letter("No letter here") is None


def test_length_reward_budget():
    assert length_reward(completion(thinking_tokens=64), 64) == 0.0
    assert length_reward(completion(thinking_tokens=96), 64) == -0.5
    assert length_reward(completion(thinking_tokens=1000), 64) == -1.0


def test_score_weights_and_components(tmp_path: Path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompt, completion, reference, **row):\n"
        "    return 1.0 if len(completion) < 60 and row['topic'] == 'endo' else 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = RLConfig(rewards=["format", "accuracy", "f1", "length", "my_rewards:brevity"],
                   reward_weights=[0.5, 1.0, 0.25, 1.0, 2.0], max_thinking_tokens=8)
    rewards = build_rewards(cfg)
    items = [completion("Metformin is first line.", thinking_tokens=12), completion("Insulin", stopped=False, thinking_tokens=8)]
    scores = score(items, ["metformin", "Metformin"], [{"topic": "endo", "completion": "clash"}, {"topic": "x"}], rewards)
    assert scores.components["format"] == [1.0, pytest.approx(2 / 3)]
    assert scores.components["accuracy"] == [1.0, 0.0]
    assert scores.components["f1"] == [pytest.approx(0.4), 0.0]  # P 1/4, R 1: 2 x 0.25 / 1.25
    assert scores.components["length"] == [-0.5, 0.0]
    assert scores.components["my_rewards:brevity"] == [1.0, 0.0]
    assert scores.total == [pytest.approx(0.5 + 1.0 + 0.1 - 0.5 + 2.0), pytest.approx(0.5 * 2 / 3)]


def test_bad_user_rewards(tmp_path: Path, monkeypatch):
    (tmp_path / "bad_rewards.py").write_text("def nan(*a, **k):\n    return float('nan')\nvalue = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match="module no_such_module cannot be imported"):
        build_rewards(RLConfig(rewards=["no_such_module:f"]))
    with pytest.raises(UserError, match="has no function value"):
        build_rewards(RLConfig(rewards=["bad_rewards:value"]))
    with pytest.raises(UserError, match="must return a finite number"):
        score([completion()], ["x"], [{}], build_rewards(RLConfig(rewards=["bad_rewards:nan"])))
    sys.modules.pop("bad_rewards", None)


def test_config_refuses_unknown_reward():
    with pytest.raises(UserError, match="did you mean 'accuracy'"):
        RLConfig(rewards=["acuracy"])


def test_possessives_agree():
    assert answer_matches("It is Graves disease.", "Graves' disease")
    assert answer_matches("Hashimoto thyroiditis", "Hashimoto's thyroiditis")
    assert answer_matches("McBurney’s point", "McBurney's point")
