"""The embedded demo: SmolLM2-135M on our English sample data, offline on a CPU.

Trains with the shipped `demo.yaml` (resuming an interrupted demo, reusing a finished
one), then evaluates base vs tuned on the held-out test questions (`evaluate.run_eval`:
loss, format compliance, answers), writes plots and the report into the output dir,
and prints the two learning figures. The English held-out rows are split in two: the demo's
lr and steps were chosen on `sample:en-dev` (bench/demo_settings.py) and it reports
`sample:en-test`, rows that played no part in choosing them. Everything it runs is the public path
(`loop.train`, `evaluate`, `plot`, `report`), nothing demo-only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from thinktune.config import RunConfig, load_config

NOTICE = "Sample data written by the thinktune authors for testing; NOT medical advice."


SHOWN = 3  # before/after answers printed


def run_demo(out: str, overrides: list[str] | None = None, overwrite: bool = False, questions: int | None = None) -> int:
    """Train (or resume, or reuse) the demo in `out`, then show base vs tuned; questions: answer only the first N
    test questions (the loss uses all of them)."""
    from thinktune.checkpoint import can_start_over, list_checkpoints
    from thinktune.loop import train

    output_dir = Path(out)
    cfg = load_config("demo", list(overrides or []) + [f"output.output_dir={out}"])
    cfg.output.overwrite = overwrite
    print(f"thinktune demo: {cfg.model.name_or_path} + LoRA on {cfg.data.path} ({NOTICE})")
    summary_file = output_dir / "summary.json"
    finished = summary_file.is_file() and not json.loads(summary_file.read_text())["stopped_early"]
    if finished and not overwrite:
        print(f"{output_dir} holds a finished demo: showing its results (pass --overwrite to train again)")
    elif list_checkpoints(output_dir) and not overwrite:
        print(f"{output_dir} holds an interrupted demo: resuming it")
        if train(cfg, resume="latest")["stopped_early"]:
            return 0
    elif can_start_over(output_dir) and output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        print(f"{output_dir} holds a demo stopped before its first checkpoint: starting it again")
        if train(cfg, resume="latest")["stopped_early"]:
            return 0
    else:
        if train(cfg)["stopped_early"]:
            return 0
    return show_results(cfg, output_dir, questions)


def show_results(cfg: RunConfig, output_dir: Path, questions: int | None = None) -> int:
    """Base vs tuned on the held-out English questions -> eval.json, plots/, report.html; print the two figures."""
    from thinktune.evaluation import EVAL_FILE, format_table, learning_figures, read_eval, run_eval
    from thinktune.generation import Answer, format_answer, side_by_side
    from thinktune.reporting import build_report

    eval_file = output_dir / EVAL_FILE
    summary_file = output_dir / "summary.json"
    result = read_eval(eval_file) if eval_file.is_file() and eval_file.stat().st_mtime > summary_file.stat().st_mtime else None
    if result is not None and questions is not None and result.get("answered_rows") != min(questions, result["rows"]):
        result = None  # a different --questions: evaluate again
    if result is None:
        print(f"\nevaluating base vs tuned on the held-out test questions of {cfg.data.eval_path} (greedy; {NOTICE})")
        result = run_eval(cfg, adapter=output_dir, out=eval_file, questions=questions)
    as_answer = lambda d: Answer(**{k: v for k, v in d.items() if k != "score"})  # noqa: E731
    shown = [entry for entry in result["answers"] if "tuned" in entry][:SHOWN]
    print(f"\nbefore/after on {len(shown)} of the held-out questions (greedy, {NOTICE}):")
    for entry in shown:
        print(f"\n### {entry['question']}")
        print(side_by_side(format_answer(as_answer(entry["base"])), format_answer(as_answer(entry["tuned"]))))
    print("\n" + format_table(result))
    html, _ = build_report(output_dir)
    print(f"\nplots: {output_dir / 'plots'}/   report: {html}")
    for line in learning_figures(result):
        print(line)
    return 0


def demo_command(args: Any) -> int:
    """`thinktune demo [--out DIR] [--overwrite] [--questions N] [overrides]`."""
    return run_demo(args.out, overrides=args.overrides, overwrite=args.overwrite, questions=args.questions)
