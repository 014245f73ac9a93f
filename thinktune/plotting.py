"""Plot: training curves from output_dir/metrics.jsonl as PNGs in output_dir/plots/.

One figure per question a user asks of a run: is the loss falling (train and eval
loss), were the gradients healthy (pre-clip grad norm, the clip threshold drawn,
spikes marked), what did the schedule do (learning rate), how fast was it
(tokens/s), how much memory did it take (peak GPU memory, when logged).
`series(records)` is the data behind every line, so tests can compare it with the
file. Figures are built on `matplotlib.figure.Figure` with the Agg canvas: no pyplot,
no global backend switch. This module reads metrics and writes PNGs, nothing else.
"""
from __future__ import annotations

import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from thinktune.checkpoint import read_run_config
from thinktune.errors import UserError
from thinktune.metrics import METRICS_FILE, read_metrics, spike_summary
from thinktune.rl.curves import rl_figures

PLOTS_DIR = "plots"
COLORS = {"train": "#1f77b4", "eval": "#d62728", "grad": "#2ca02c", "clip": "#ff7f0e", "spike": "#d62728",
          "lr": "#9467bd", "speed": "#17becf", "mem": "#8c564b", "skip": "#7f7f7f"}


@dataclass
class Series:
    """The numbers behind the plots, in step order, straight from metrics.jsonl."""

    steps: list[int] = field(default_factory=list)  # logged (non-skipped) train steps
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    mem_steps: list[int] = field(default_factory=list)
    peak_mem_gib: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    spike_steps: list[int] = field(default_factory=list)
    spike_norms: list[float] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    clip: float | None = None
    summary: dict[str, Any] | None = None


def series(records: list[dict[str, Any]]) -> Series:
    s = Series()
    for r in records:
        kind = r.get("kind", "train")
        if kind == "train" and r.get("skipped"):
            s.skipped_steps.append(r["step"])
        elif kind == "train" and r.get("loss") is not None:
            s.steps.append(r["step"])
            s.loss.append(r["loss"])
            s.grad_norm.append(r["grad_norm"])
            s.lr.append(r["lr"])
            s.tokens_per_s.append(r["tokens_per_s"])
            if r.get("clip") is not None:
                s.clip = r["clip"]
            if r.get("spike"):
                s.spike_steps.append(r["step"])
                s.spike_norms.append(r["grad_norm"])
            if r.get("peak_mem_gib") is not None:
                s.mem_steps.append(r["step"])
                s.peak_mem_gib.append(r["peak_mem_gib"])
        elif kind == "eval" and "eval_loss" in r:  # RL evaluations score answers instead (thinktune.rl.curves)
            s.eval_steps.append(r["step"])
            s.eval_loss.append(r["eval_loss"])
        elif kind == "summary":
            s.summary = r
            if s.clip is None:
                s.clip = r.get("clip")
    return s


# ----------------------------------------------------------------------------- figures

def _figure(title: str, ylabel: str, caption: str | None = None) -> tuple[Any, Any]:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4.6), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=13)
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if caption:
        fig.supxlabel(textwrap.fill(caption, 110), fontsize=8.5, color="#444444")
    return fig, ax


def _mark_skipped(ax: Any, s: Series) -> None:
    for i, step in enumerate(s.skipped_steps):
        ax.axvline(step, color=COLORS["skip"], linestyle=":", linewidth=1,
                   label="skipped step (NaN/Inf)" if i == 0 else None)


def loss_figure(s: Series) -> Any:
    fig, ax = _figure("Loss: training vs held-out eval", "cross-entropy loss (nats / target token)")
    ax.plot(s.steps, s.loss, color=COLORS["train"], linewidth=1.6, label="train loss (mean since last log)")
    if s.eval_steps:
        ax.plot(s.eval_steps, s.eval_loss, color=COLORS["eval"], marker="o", linewidth=1.6, label="eval loss (held-out)")
        best = min(range(len(s.eval_loss)), key=s.eval_loss.__getitem__)
        ax.plot([s.eval_steps[best]], [s.eval_loss[best]], marker="*", markersize=16, color="gold",
                markeredgecolor="black", linestyle="none", label=f"best eval {s.eval_loss[best]:.3f} @ step {s.eval_steps[best]}")
    _mark_skipped(ax, s)
    ax.legend(loc="upper right")
    return fig


def grad_norm_figure(s: Series, caption: str | None = None) -> Any:
    clip = s.clip or 0.0
    title = "Gradient norm before clipping" + ("" if clip > 0 else " (clipping OFF)")
    fig, ax = _figure(title, "global L2 grad norm (pre-clip)", caption)
    ax.plot(s.steps, s.grad_norm, color=COLORS["grad"], linewidth=1.4, marker=".", label="grad norm at logged steps")
    if clip > 0:
        ax.axhline(clip, color=COLORS["clip"], linestyle="--", linewidth=1.5, label=f"clip threshold (max_grad_norm={clip:g})")
    if s.spike_steps:
        shown = ", ".join(map(str, s.spike_steps[:6])) + (" ..." if len(s.spike_steps) > 6 else "")
        ax.plot(s.spike_steps, s.spike_norms, linestyle="none", marker="X", markersize=11, color=COLORS["spike"],
                label=f"spike at step {shown}")
        gap, last = 0.04 * max(1, s.steps[-1] - s.steps[0]), None
        for step, value in zip(s.spike_steps, s.spike_norms):
            if last is None or step - last > gap:  # neighbouring spikes share one label
                ax.annotate(f"step {step}", (step, value), textcoords="offset points", xytext=(7, -4), fontsize=8,
                            color=COLORS["spike"])
                last = step
    positive = [g for g in s.grad_norm if g > 0]
    if positive and max(positive) > 20 * statistics.median(positive):
        ax.set_yscale("log")  # spikes of 50 among values < 5 would flatten the rest on a linear axis
        ax.set_ylabel("global L2 grad norm (pre-clip, log scale)")
        from matplotlib.ticker import ScalarFormatter

        ax.yaxis.set_major_formatter(ScalarFormatter())
    _mark_skipped(ax, s)
    ax.legend(loc="best")
    return fig


def lr_figure(s: Series) -> Any:
    fig, ax = _figure("Learning rate schedule", "learning rate")
    ax.plot(s.steps, s.lr, color=COLORS["lr"], linewidth=1.6, label="learning rate at logged steps")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.legend(loc="upper right")
    return fig


def throughput_figure(s: Series) -> Any:
    fig, ax = _figure("Training throughput", "tokens / second (real, non-pad)")
    ax.plot(s.steps, s.tokens_per_s, color=COLORS["speed"], linewidth=1.4, marker=".", label="tokens/s of the logged step")
    if s.tokens_per_s:
        median = statistics.median(s.tokens_per_s)
        ax.axhline(median, color="black", linestyle="--", linewidth=1, label=f"median {median:,.0f} tokens/s")
        ax.set_ylim(0, 1.2 * max(s.tokens_per_s))
    ax.legend(loc="lower right")
    return fig


def memory_figure(s: Series) -> Any:
    fig, ax = _figure("Peak GPU memory", "peak allocated memory (GiB)")
    ax.plot(s.mem_steps, s.peak_mem_gib, color=COLORS["mem"], linewidth=1.6, marker=".", label="torch.cuda.max_memory_allocated")
    ax.set_ylim(0, 1.2 * max(s.peak_mem_gib))
    ax.legend(loc="lower right")
    return fig


def spike_caption(s: Series, spike_factor: float | None) -> str | None:
    """The run's spike summary line (as the training log printed it), when the run finished."""
    if s.summary is None:
        return None
    return spike_summary(s.summary.get("spikes", []), s.summary.get("clip", s.clip or 0.0), spike_factor or 10.0)


def figures(s: Series, spike_factor: float | None = None) -> dict[str, Any]:
    """name -> Figure for every plot this run has data for."""
    if not s.steps:
        return {}
    built: dict[str, Callable[[], Any]] = {
        "loss": lambda: loss_figure(s),
        "grad_norm": lambda: grad_norm_figure(s, spike_caption(s, spike_factor)),
        "lr": lambda: lr_figure(s),
        "tokens_per_s": lambda: throughput_figure(s),
    }
    if s.peak_mem_gib:
        built["memory"] = lambda: memory_figure(s)
    made = {name: make() for name, make in built.items()}
    for fig in made.values():
        whole_step_axis(fig.axes[0])
    return made


def whole_step_axis(ax: Any) -> None:
    """Ticks on whole steps only; a run with one or two logged steps gets a range wide enough to hold some."""
    low, high = ax.get_xlim()
    if high - low < 2:
        middle = round((low + high) / 2)
        ax.set_xlim(middle - 1.5, middle + 1.5)


def spike_factor_of(output_dir: Path) -> float | None:
    saved = read_run_config(output_dir)
    return saved.get("train", {}).get("spike_factor") if saved else None


def plot_run(output_dir: str | Path) -> list[Path]:
    """Write output_dir/plots/*.png from metrics.jsonl; return the files written."""
    folder = Path(output_dir)
    records = read_metrics(folder)
    if not records:
        raise UserError(f"{folder / METRICS_FILE} not found or empty: nothing to plot (is {folder} a run's output_dir?)")
    s = series(records)
    figs = figures(s, spike_factor_of(folder))
    figs.update(rl_figures(records))
    if not figs:
        raise UserError(f"{folder / METRICS_FILE} holds no logged training step yet")
    out = folder / PLOTS_DIR
    out.mkdir(exist_ok=True)
    written = []
    for name, fig in figs.items():
        path = out / f"{name}.png"
        fig.savefig(path)
        written.append(path)
    return written


def plot_command(args: Any) -> int:
    """`thinktune plot OUTPUT_DIR`."""
    for path in plot_run(args.output_dir):
        print(f"wrote {path}")
    return 0
