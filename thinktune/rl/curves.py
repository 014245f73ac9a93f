"""RL curves and report figures: rewards, accuracy and format, completion lengths from metrics.jsonl.

`rl_figures(records)` draws the RL plots of a `train.objective: grpo` run (nothing for an SFT run);
`rl_summary(records)` gives the numbers the report shows: held-out greedy accuracy and format rate
before training (the step-0 evaluation) and after (the last one), the reward of the first and last
logged windows, and sampled completions. Figures use matplotlib's `Figure` with the Agg canvas, as
thinktune.plotting does. This module reads metrics records; it writes nothing itself.
"""
from __future__ import annotations

from typing import Any

COLORS = ["#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf"]


def _train(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == "train" and r.get("reward") is not None]


def _evals(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == "eval" and "eval_accuracy" in r]


def _figure(title: str, ylabel: str) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.6), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=13)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def reward_figure(train: list[dict[str, Any]]) -> Any:
    fig, ax = _figure("Rewards of the sampled completions (mean per logging window)", "reward")
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["reward"] for r in train], color="black", linewidth=2, label="total (weighted sum)")
    names = sorted({k for r in train for k in r if k.startswith("reward/") and not k.endswith("_std")})
    for i, name in enumerate(names):
        ax.plot(steps, [r.get(name) for r in train], color=COLORS[i % len(COLORS)], linewidth=1.3,
                label=name.removeprefix("reward/"))
    ax.legend(loc="best", fontsize=8)
    return fig


def accuracy_figure(train: list[dict[str, Any]], evals: list[dict[str, Any]]) -> Any:
    fig, ax = _figure("Accuracy and format: sampled (train) vs greedy (held-out)", "share of completions")
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["accuracy"] for r in train], color=COLORS[0], linewidth=1.3, label="accuracy, sampled")
    ax.plot(steps, [r["format_rate"] for r in train], color=COLORS[1], linewidth=1.3, label="format, sampled")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], color=COLORS[0], marker="o",
                linestyle="--", label="accuracy, held-out greedy")
        ax.plot([r["step"] for r in evals], [r["eval_format_rate"] for r in evals], color=COLORS[1], marker="s",
                linestyle="--", label="format, held-out greedy")
    ax.set_ylim(-0.03, 1.03)
    ax.legend(loc="best", fontsize=8)
    return fig


def length_figure(train: list[dict[str, Any]]) -> Any:
    fig, ax = _figure("Completion length and truncation", "tokens")
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["completion_length"] for r in train], color=COLORS[3], linewidth=1.5, label="mean completion tokens")
    right = ax.twinx()
    right.plot(steps, [r["truncation_rate"] for r in train], color=COLORS[2], linewidth=1.2, label="truncated (share)")
    right.set_ylim(-0.03, 1.03)
    right.set_ylabel("share truncated")
    lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="best", fontsize=8)
    return fig


def rl_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """name -> Figure for a GRPO run's records (empty for other runs)."""
    train = _train(records)
    if not train:
        return {}
    return {"reward": reward_figure(train), "rl_accuracy": accuracy_figure(train, _evals(records)),
            "completion_length": length_figure(train)}


RL_CURVES = [("reward", "Rewards"), ("rl_accuracy", "Accuracy and format"), ("completion_length", "Completion length")]


def rl_summary(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Before/after figures of a GRPO run, or None for other runs."""
    train, evals = _train(records), _evals(records)
    if not train and not evals:
        return None
    keys = ["accuracy", "format_rate", "reward", "completion_length"]
    before, after = (evals[0], evals[-1]) if evals else ({}, {})
    rows = [[key.replace("_", " "), _fmt(before.get(f"eval_{key}")), _fmt(after.get(f"eval_{key}"))] for key in keys]
    samples = [s for r in train for s in r.get("samples", [])]
    return {
        "before_step": before.get("step"), "after_step": after.get("step"), "problems": after.get("eval_problems"),
        "rows": rows, "first_reward": train[0]["reward"] if train else None, "last_reward": train[-1]["reward"] if train else None,
        "first_step": train[0]["step"] if train else None, "last_step": train[-1]["step"] if train else None,
        "examples": after.get("examples", []), "samples": samples[-3:],
    }


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def rl_check_line(rl: dict[str, Any]) -> str:
    """One line on whether the reward rose and what held-out greedy accuracy did."""
    parts = []
    if rl["first_reward"] is not None:
        parts.append(f"mean reward {rl['first_reward']:.3f} at step {rl['first_step']} -> {rl['last_reward']:.3f} at "
                     f"step {rl['last_step']}")
    if rl["before_step"] is not None:
        acc, fmt = rl["rows"][0], rl["rows"][1]
        parts.append(f"held-out greedy accuracy {acc[1]} -> {acc[2]}, format {fmt[1]} -> {fmt[2]} (step "
                     f"{rl['before_step']} -> {rl['after_step']}, {rl['problems']} problems)")
    return "; ".join(parts)
