"""thinktune: LoRA / QLoRA fine-tuning of reasoning ("thinking") LLMs on chain-of-thought data.

Python API for notebooks:

    import thinktune
    summary = thinktune.train("configs/demo.yaml", overrides=["train.max_steps=20"])
    answers = thinktune.generate(["What causes anaemia?"], adapter="demo-output")

This module only forwards to loop.train and generation.generate (imported when called, so
`import thinktune` stays light); it holds no logic of its own.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def train(config: Any, overrides: list[str] | None = None, resume: str | None = None) -> dict[str, Any]:
    """Train from a RunConfig, a YAML path or a shipped config name; return the run summary."""
    from thinktune.config import RunConfig, apply_overrides, config_from_dict, load_config
    from thinktune.loop import train as _train

    if isinstance(config, RunConfig):
        cfg = config_from_dict(apply_overrides(config.to_dict(), overrides or []))
    elif isinstance(config, dict):
        cfg = config_from_dict(apply_overrides(config, overrides or []))
    else:
        cfg = load_config(config, overrides)
    return _train(cfg, resume=resume)


def generate(questions: list[str] | str, adapter: str | None = None, base: str | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    """Answer questions with base or base + adapter; each result has thinking and answer apart."""
    from thinktune.generation import generate as _generate

    if isinstance(questions, str):
        questions = [questions]
    return _generate(questions, adapter=adapter, base=base, **kwargs)
