"""Verifiable problems: the packaged sample set, local files with mapped columns, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from thinktune.config import DataConfig, RLConfig
from thinktune.errors import UserError
from thinktune.rl.problems import load_problems
from thinktune.rl.rewards import answer_matches, normalize_text


def test_sample_problems_load_and_are_self_consistent():
    train, report = load_problems("sample:verifiable-en", DataConfig(), RLConfig())
    held, _ = load_problems("sample:verifiable-en-heldout", DataConfig(), RLConfig())
    assert (len(train), len(held), report.rows_read, report.skipped_bad) == (100, 20, 100, 0)
    assert not {p.question for p in train} & {p.question for p in held}
    for problem in train + held:
        assert answer_matches(problem.reference, problem.reference)  # the reference earns the accuracy reward
        assert answer_matches(f"The answer is {problem.reference}.", problem.reference)
        assert len(normalize_text(problem.reference).split()) <= 4  # short answers: verifiable by matching


def test_local_csv_with_mapped_columns_keeps_other_columns(tmp_path: Path):
    file = tmp_path / "problems.csv"
    file.write_text("q,gold,topic\nWhich organ makes bile?,Liver,gi\n  ,x,gi\nWhat is 2+2?,4,math\n", encoding="utf-8")
    rl = RLConfig(question_column="q", answer_column="gold")
    problems, report = load_problems(str(file), DataConfig(), rl)
    assert [(p.question, p.reference, p.row) for p in problems] == [
        ("Which organ makes bile?", "Liver", {"topic": "gi"}), ("What is 2+2?", "4", {"topic": "math"})]
    assert report.skipped_bad == 1
    with pytest.raises(UserError, match="row 2 has an empty or non-text q"):
        load_problems(str(file), DataConfig(strict=True), rl)
    assert len(load_problems(str(file), DataConfig(max_rows=1), rl)[0]) == 1


def test_missing_columns_name_the_mapping(tmp_path: Path):
    file = tmp_path / "p.jsonl"
    file.write_text(json.dumps({"Question": "q", "Answer": "a"}) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_problems(str(file), DataConfig(), RLConfig())
    message = str(info.value)
    assert "missing column(s) Open-ended Verifiable Question, Ground-True Answer" in message
    assert "columns found: Question, Answer" in message and "rl.question_column=" in message
    with pytest.raises(UserError, match="did you mean 'sample:verifiable-en'"):
        load_problems("sample:verifiable-eng", DataConfig(), RLConfig())
