"""Verifiable problems: rows of (question, reference answer) for reinforcement learning.

Read with the same table loader as the SFT data (a hub id such as
FreedomIntelligence/medical-o1-verifiable-problem, or local .json/.jsonl/.csv/.parquet files or
folders), with the columns named by `rl.question_column` / `rl.answer_column` (the defaults are that
data set's "Open-ended Verifiable Question" and "Ground-True Answer"). Every other column of a row is
kept and handed to user rewards as keyword arguments. `sample:verifiable-en` (and
`sample:verifiable-en-heldout`) are the short-answer problems written for thinktune's demo and tests.
This module never tokenises and never loads a model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from thinktune.config import DataConfig, RLConfig
from thinktune.data import VERIFIABLE_SAMPLES, DataReport, carve_eval, resolve_data_path
from thinktune.errors import UserError, did_you_mean
from thinktune.sources import read_rows


@dataclass
class Problem:
    question: str
    reference: str
    row: dict[str, Any] = field(default_factory=dict)
    """The row's other columns (for user rewards)."""


def resolve_problem_path(path: str) -> str:
    """'sample:verifiable-en[-heldout]' -> the packaged file; other paths as the SFT loader resolves them."""
    if path in VERIFIABLE_SAMPLES:
        return str(VERIFIABLE_SAMPLES[path])
    if path.startswith("sample:verifiable"):
        choices = list(VERIFIABLE_SAMPLES)
        raise UserError(f"unknown sample problems '{path}'{did_you_mean(path, choices)}; choose one of {', '.join(choices)}")
    return resolve_data_path(path)


def load_problems(path: str, data: DataConfig, rl: RLConfig, split: str | None = None) -> tuple[list[Problem], DataReport]:
    """Read (question, reference) rows, skipping (or, with data.strict, refusing) empty and non-text fields."""
    table = read_rows(resolve_problem_path(path), data.subset, split or data.split)
    found = list(table.columns)
    wanted = {"question_column": rl.question_column, "answer_column": rl.answer_column}
    missing = {key: col for key, col in wanted.items() if col not in found}
    if missing:
        unused = [c for c in found if c not in wanted.values()]
        hints = []
        for key, col in missing.items():
            close = did_you_mean(col, unused)
            guess = close.split("'")[1] if close else (unused[0] if unused else "<column>")
            unused = [c for c in unused if c != guess]
            hints.append(f"rl.{key}='{guess}'")
        raise UserError(f"{path}: missing column(s) {', '.join(missing.values())}; columns found: "
                        f"{', '.join(found) or 'none'}; map them with e.g. {' '.join(hints)}")
    report = DataReport(source=path)
    problems: list[Problem] = []
    for row_no, (line_no, row) in enumerate(table.rows, start=1):
        report.rows_read += 1
        question, reference = row.get(rl.question_column), row.get(rl.answer_column)
        bad = [col for col, v in ((rl.question_column, question), (rl.answer_column, reference))
               if not isinstance(v, str) or not v.strip()]
        if bad:
            if data.strict:
                where = f"line {line_no}; " if table.unit == "line" else ""
                raise UserError(f"{path}: row {row_no} has an empty or non-text {', '.join(bad)} ({where}data.strict is "
                                f"on; fix the row or turn strict off to skip it)")
            report.skipped_bad += 1
            continue
        extra = {k: v for k, v in row.items() if k not in wanted.values()}
        problems.append(Problem(question.strip(), reference.strip(), extra))
        report.lengths.append(len(question))
        if data.max_rows and len(problems) >= data.max_rows:
            break
    if not problems:
        raise UserError(f"{path}: no usable problems ({report.rows_read} rows read, {report.skipped_bad} with empty "
                        f"or non-text fields)")
    return problems, report


def load_problem_splits(data: DataConfig, rl: RLConfig, seed: int) -> tuple[list[Problem], list[Problem], list[DataReport]]:
    """Train and held-out problems by the rules of `data.load_splits`: data.eval_path / eval_split when set,
    else data.eval_size problems carved from train with the run's seed, else none."""
    train, report = load_problems(data.path, data, rl)
    if data.eval_path or data.eval_split:
        held, held_report = load_problems(data.eval_path or data.path, data, rl, data.eval_split)
        held_report.source = f"eval {held_report.source}"
        return train, held, [report, held_report]
    train, held = carve_eval(train, data.eval_size, seed)  # type: ignore[arg-type]
    return train, held, [report]  # type: ignore[return-value]
