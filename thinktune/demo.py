"""The embedded demo: SmolLM2-135M on our English sample data, offline on a CPU.

Trains with the shipped `demo.yaml` (resuming an interrupted demo, reusing a finished
one), then shows base vs tuned answers to held-out questions. Everything it runs is
the public path (`loop.train`, `generate`), nothing demo-only.
"""
from __future__ import annotations

import json
from pathlib import Path

from thinktune.config import load_config
from thinktune.data import load_samples

NOTICE = "Sample data written by the thinktune authors for testing; NOT medical advice."


def run_demo(out: str, overrides: list[str] | None = None, overwrite: bool = False, questions: int = 3) -> int:
    from thinktune.checkpoint import list_checkpoints
    from thinktune.generate import generate
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
    else:
        if train(cfg)["stopped_early"]:
            return 0
    held_out, _ = load_samples(cfg.data.eval_path or cfg.data.path, cfg.data)
    picked = [s.question for s in held_out[:questions]]
    print(f"\nbefore/after on {len(picked)} held-out questions (greedy, {NOTICE}):")
    generate(picked, adapter=str(output_dir), max_new_tokens=256, compare=True, stream=False)
    return 0

