"""thinktune: LoRA / QLoRA fine-tuning of reasoning ("thinking") LLMs on chain-of-thought data.

Python API for notebooks (nothing is printed unless asked; the heavy imports happen on first use):

    import thinktune
    summary = thinktune.train("configs/demo.yaml", overrides=["train.max_steps=20"])
    model = thinktune.load(adapter="demo-output")          # loaded once, reused by every call
    reply = model.generate("What causes iron deficiency anaemia?")
    print(reply["thinking"], reply["answer"], sep="\\n---\\n")
    result = thinktune.evaluate(adapter="demo-output")     # base vs tuned on held-out rows
    thinktune.plot("demo-output"); thinktune.report("demo-output")
    thinktune.merge("demo-output", "merged-16bit")

This module forwards to the stages (imported when called, so `import thinktune` stays light); besides
the model `generate` keeps between calls it holds no logic of its own.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from thinktune.config import RunConfig
    from thinktune.generation import Model

__version__ = "0.1.0"
__all__ = ["train", "load", "generate", "evaluate", "merge", "plot", "report", "__version__"]

_loaded: dict[tuple[str | None, str | None, str | None], "Model"] = {}  # the model `generate` keeps between calls


def _config(config: "RunConfig | dict[str, Any] | str | Path", overrides: Sequence[str] | None) -> "RunConfig":
    from thinktune.config import RunConfig, apply_overrides, config_from_dict, load_config

    if isinstance(config, RunConfig):
        return config_from_dict(apply_overrides(config.to_dict(), list(overrides or [])))
    if isinstance(config, dict):
        return config_from_dict(apply_overrides(config, list(overrides or [])))
    return load_config(config, list(overrides or []))


def train(config: "RunConfig | dict[str, Any] | str | Path", overrides: Sequence[str] | None = None,
          resume: str | None = None, verbose: bool = True) -> dict[str, Any]:
    """Train from a RunConfig, a dict, a YAML path or a shipped config name; return the run summary.

    overrides: "key.path=value" strings; resume: "latest" or a checkpoint folder; verbose=False hides the
    log lines (the progress bar stays)."""
    from thinktune.loop import train as _train

    return _train(_config(config, overrides), resume=resume, log=print if verbose else (lambda line: None))


def load(adapter: str | Path | None = None, base: str | None = None, template: str | None = None) -> "Model":
    """Load base (+ adapter) once; call `.generate(...)` on the result as often as you like."""
    from thinktune.generation import Model

    return Model(adapter, base, template)


def generate(questions: str | list[str], adapter: str | Path | None = None, base: str | None = None,
             template: str | None = None, max_new_tokens: int = 512, temperature: float = 0.0,
             compare: bool = False, show: bool = False) -> Any:
    """Answer a question (-> a dict with "thinking" and "answer") or a list (-> a list of dicts).

    The loaded model is kept for the next call with the same adapter/base/template (use `load` to hold
    several). compare=True gives base and tuned per question; show=True prints the answers."""
    key = (str(adapter) if adapter is not None else None, base, template)
    if key not in _loaded:
        _loaded.clear()  # one model at a time: a 7B does not fit twice
        _loaded[key] = load(adapter, base, template)
    return _loaded[key].generate(questions, max_new_tokens, temperature, compare=compare, show=show)


def evaluate(config: "RunConfig | str | Path | None" = None, adapter: str | Path | None = None,
             base: str | None = None, data: str | None = None, n: int | None = None,
             max_new_tokens: int | None = None, with_base: bool = True, generations: bool = True,
             out: str | Path | None = None, verbose: bool = False) -> dict[str, Any]:
    """Base vs tuned on held-out rows (what `thinktune eval` measures); returns the results dict
    ("models" -> {"base", "tuned"} -> loss, ppl, format shares; "answers")."""
    from thinktune.evaluation import run_eval

    return run_eval(config, adapter, base, data, n, max_new_tokens, with_base=with_base, generations=generations,
                    out=out, log=print if verbose else (lambda line: None), progress=verbose)


def merge(adapter: str | Path, out: str | Path, dtype: str = "bf16", base: str | None = None) -> Path:
    """Merge an adapter into its base and save a 16-bit model folder; returns the folder."""
    from thinktune.export import merge as _merge

    return Path(_merge(adapter, out, dtype=dtype, base=base, log=lambda line: None))


def plot(output_dir: str | Path) -> list[Path]:
    """Write a run's training curves as PNGs into OUTPUT_DIR/plots/; returns the files."""
    from thinktune.plotting import plot_run

    return plot_run(output_dir)


def report(output_dir: str | Path, answers: int = 3) -> Path:
    """Write OUTPUT_DIR/report.html (self-contained) and report.md; returns the HTML file."""
    from thinktune.reporting import build_report

    return build_report(output_dir, answers=answers, log=lambda line: None)[0]

