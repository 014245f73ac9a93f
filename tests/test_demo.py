"""`thinktune demo` end to end with a tiny model in place of SmolLM2 (an override): --questions limits the
generation, progress shows while generating, a re-run shows the finished demo, a demo stopped before its first
checkpoint starts again."""
from __future__ import annotations

import json
from pathlib import Path

from thinktune import checkpoint as ckpt
from thinktune.cli import main


def demo_args(out: Path, tiny: Path, *extra: str) -> list[str]:
    return ["demo", "--out", str(out), *extra, f"model.name_or_path={tiny}", "train.max_steps=2",
            "train.save_steps=1", "train.eval_steps=0"]


def test_demo_questions_limit_generation_and_progress_shows(tiny_qwen2: Path, tmp_path: Path, capsys):
    out = tmp_path / "demo"
    assert main(demo_args(out, tiny_qwen2, "--questions", "2")) == 0
    captured = capsys.readouterr()
    result = json.loads((out / "eval.json").read_text())
    assert result["data"] == "sample:en-test" and result["rows"] == 10 and result["answered_rows"] == 2
    assert "base: generating 2 answers" in captured.err and "tuned: generating 2 answers" in captured.err
    assert "evaluating at step 2 on 10 held-out rows" in captured.out  # the end-of-training eval says it started
    assert "before/after on 2 of the held-out questions" in captured.out and (out / "report.html").is_file()
    # a second run shows the finished demo without training or generating again
    assert main(demo_args(out, tiny_qwen2, "--questions", "2")) == 0
    again = capsys.readouterr()
    assert "holds a finished demo" in again.out and "generating" not in again.err


def test_demo_stopped_before_its_first_checkpoint_starts_again(tiny_qwen2: Path, tmp_path: Path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / ckpt.RUN_FILE).write_text(json.dumps({"run_id": "x", "started": 0}))
    (out / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 3.0}) + "\n")
    assert main(demo_args(out, tiny_qwen2, "--questions", "1")) == 0
    assert "stopped before its first checkpoint: starting it again" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").is_file()
