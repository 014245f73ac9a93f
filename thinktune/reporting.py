"""Report: one self-contained HTML page (and a Markdown twin) that says whether a run worked.

`build_report(output_dir)` gathers what a run left behind — thinktune_config.json, metrics.jsonl,
summary.json, eval.json (from `thinktune eval`), plots/ (drawn if missing) — and the
data statistics, recomputed by re-reading the run's data with its config and
tokenizer (deterministic: the same rows, truncations and drops training saw). It
writes output_dir/report.html (images inlined as base64 data URIs, CSS inline, no
external assets: it opens from disk without a server) and output_dir/report.md (images
linked from plots/). `collect(output_dir)` returns the numbers both pages show.
This module reads a run folder and writes the two pages and plots/token_lengths.png; it never
trains and never loads a model.
"""
from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from thinktune.checkpoint import read_run_config
from thinktune.errors import UserError
from thinktune.evaluation import EVAL_FILE, learning_figures, read_eval, table_rows
from thinktune.metrics import METRICS_FILE, read_metrics
from thinktune.plotting import PLOTS_DIR, plot_run, series, spike_caption
from thinktune.rl.curves import RL_CURVES, rl_check_line, rl_summary

HTML_FILE, MD_FILE = "report.html", "report.md"
HISTOGRAM = "token_lengths.png"
CURVES = [("loss", "Loss"), ("grad_norm", "Gradient norm (pre-clip)"), ("lr", "Learning rate"),
          ("tokens_per_s", "Throughput"), ("memory", "Peak GPU memory")] + RL_CURVES
TARGET_LOSS_DROP, TARGET_FORMAT_OK = 0.20, 0.90  # the demo's bar: eval loss -20%, 90% well-formed (the demo only)
FEW_EVAL_ROWS = 10  # below this many held-out rows the figures move a lot with one answer


# ----------------------------------------------------------------------------- gathering

def data_statistics(cfg: Any, output_dir: Path) -> tuple[list[dict[str, Any]], str | None]:
    """Re-read the run's data as `setup.prepare` does (data.load_splits); (one dict per data source, or [] and why not)."""
    from thinktune.data import PromptFormat, build_examples, load_splits
    from thinktune.model import ModelSource, load_tokenizer, resolve_source

    try:
        source = ModelSource(str(output_dir)) if (output_dir / "tokenizer_config.json").is_file() else resolve_source(cfg.model)
        tokenizer = load_tokenizer(source)  # never trust_remote_code from a saved config
        fmt = PromptFormat.from_config(cfg.data, tokenizer)
        splits = load_splits(cfg.data, cfg.train.seed)
        pairs = [(splits.train, splits.train_report)]
        if splits.eval_kind != "none" or cfg.data.eval_size:
            pairs.append((splits.eval, splits.eval_report))
        stats = []
        for rows, rep in pairs:
            build_examples(rows, fmt, tokenizer, cfg.data, rep)
            stats.append({"source": rep.source, "rows_read": rep.rows_read, "used": len(rep.lengths),
                          "skipped_bad": rep.skipped_bad, "truncated": rep.truncated, "dropped": rep.dropped_overlong,
                          "lengths": rep.lengths, "length_stats": rep.length_stats(), "summary": rep.summary()})
        return stats, None
    except UserError as exc:
        return [], f"data statistics unavailable: {exc}"


def histogram_figure(stats: list[dict[str, Any]], max_seq_length: int) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.8), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    all_lengths = [n for s in stats for n in s["lengths"]]
    bins = min(40, max(5, len(set(all_lengths))))
    ax.hist([s["lengths"] for s in stats], bins=bins, label=[s["source"] for s in stats], stacked=True)
    if max(all_lengths) >= 0.8 * max_seq_length:
        ax.axvline(max_seq_length, color="#d62728", linestyle="--", label=f"max_seq_length {max_seq_length}")
    ax.set_title("Token length per row (prompt + completion + EOS, after truncation; stacked)", fontsize=12)
    ax.set_xlabel("tokens")
    ax.set_ylabel("rows")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def collect(output_dir: str | Path, answers: int = 3, with_data: bool = True) -> dict[str, Any]:
    """Everything the report shows, as plain values."""
    from thinktune.config import config_from_dict

    folder = Path(output_dir)
    records = read_metrics(folder)
    if not records:
        raise UserError(f"{folder / METRICS_FILE} not found or empty: is {folder} a run's output_dir?")
    config = read_run_config(folder) or {}
    cfg = config_from_dict(config) if config else None
    s = series(records)
    plots = plot_run(folder)
    summary = s.summary or {}
    run = {
        "output_dir": str(folder), "model": config.get("model", {}).get("name_or_path", "?"),
        "data": config.get("data", {}).get("path", "?"), "steps": summary.get("step", s.steps[-1] if s.steps else 0),
        "total_steps": summary.get("total_steps"), "seconds": summary.get("seconds"),
        "stopped_early": summary.get("stopped_early"),
        "first_loss": s.loss[0] if s.loss else None, "final_loss": s.loss[-1] if s.loss else None,
        "first_eval_loss": s.eval_loss[0] if s.eval_loss else None,
        "final_eval_loss": s.eval_loss[-1] if s.eval_loss else None,
        "best_eval_loss": min(s.eval_loss) if s.eval_loss else None,
        "best_eval_step": s.eval_steps[s.eval_loss.index(min(s.eval_loss))] if s.eval_loss else None,
        "best_checkpoint": summary.get("best_checkpoint"), "skipped_steps": s.skipped_steps,
        "median_tokens_per_s": sorted(s.tokens_per_s)[len(s.tokens_per_s) // 2] if s.tokens_per_s else None,
        "peak_mem_gib": max(s.peak_mem_gib) if s.peak_mem_gib else None,
    }
    spike_factor = config.get("train", {}).get("spike_factor")
    spikes = spike_caption(s, spike_factor) or (f"grad-norm spikes so far: {len(s.spike_steps)} "
                                                f"(the run has not finished; no summary yet)")
    rl = rl_summary(records)
    if rl is not None:  # RL problems are questions with reference answers: no token statistics to recompute
        data_stats, data_note = [], f"verifiable problems from {config.get('data', {}).get('path', '?')} (RL run)"
    else:
        data_stats, data_note = data_statistics(cfg, folder) if cfg and with_data else ([], "no thinktune_config.json" if not cfg else None)
    if data_stats:
        fig = histogram_figure(data_stats, cfg.data.max_seq_length)
        fig.savefig(folder / PLOTS_DIR / HISTOGRAM)
    evaluation = read_eval(folder / EVAL_FILE)
    return {"run": run, "config": config, "spikes": spikes, "plots": [p.name for p in plots], "data": data_stats,
            "data_note": data_note, "eval": evaluation, "answers": (evaluation or {}).get("answers", [])[:answers],
            "rl": rl,
            "created": time.strftime("%Y-%m-%d %H:%M")}


def is_demo(config: dict[str, Any]) -> bool:
    """Whether a run's config is the shipped demo's (its output folder aside): the only run with set targets."""
    from thinktune.config import load_config

    if not config:
        return False
    demo = load_config("demo").to_dict()
    return {k: v for k, v in config.items() if k != "output"} == {k: v for k, v in demo.items() if k != "output"}


def eval_caveat(evaluation: dict[str, Any] | None) -> str | None:
    """A warning when the held-out figures rest on too few rows to mean much."""
    if not evaluation or evaluation.get("rows", 0) >= FEW_EVAL_ROWS:
        return None
    return (f"only {evaluation['rows']} held-out rows: one answer moves format compliance by "
            f"{100 / max(1, evaluation.get('answered_rows', evaluation['rows'])):.0f} points; evaluate on "
            f"{FEW_EVAL_ROWS} or more rows (thinktune eval --data FILE) before trusting these figures")


def figure_checks(evaluation: dict[str, Any] | None, demo: bool = False) -> list[tuple[str, bool | None]]:
    """The two learning figures; for the demo, with whether each meets its bar (otherwise None: no target)."""
    if not evaluation:
        return []
    models = evaluation.get("models", {})
    base, tuned = models.get("base"), models.get("tuned")
    lines = learning_figures(evaluation)
    if not lines:
        return []
    if not demo:
        return [(line, None) for line in lines]
    checks: list[tuple[str, bool | None]] = [
        (lines[0] + f" — the demo's target: at least {TARGET_LOSS_DROP:.0%} lower",
         tuned["loss"] <= (1 - TARGET_LOSS_DROP) * base["loss"])]
    if len(lines) > 1:
        checks.append((lines[1] + f" — the demo's target: at least {TARGET_FORMAT_OK:.0%}",
                       tuned["format_ok"] >= TARGET_FORMAT_OK))
    return checks


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def run_rows(run: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        ("base model", run["model"]), ("training data", run["data"]),
        ("steps", f"{run['steps']} of {run['total_steps']}" + (" (stopped early)" if run["stopped_early"] else "")),
        ("wall time", f"{run['seconds'] / 60:.1f} min" if run["seconds"] is not None else "-"),
        ("train loss, first logged -> last logged", f"{_num(run['first_loss'])} -> {_num(run['final_loss'])}"),
        ("eval loss, first -> last", f"{_num(run['first_eval_loss'])} -> {_num(run['final_eval_loss'])}"),
        ("best eval loss", f"{_num(run['best_eval_loss'])} at step {run['best_eval_step']}" if run["best_eval_loss"] is not None else "-"),
        ("best checkpoint", run["best_checkpoint"] or "-"),
        ("median tokens/s", _num(run["median_tokens_per_s"], 1)),
        ("skipped steps (NaN/Inf)", ", ".join(map(str, run["skipped_steps"])) or "none"),
    ]
    if run["peak_mem_gib"] is not None:
        rows.append(("peak GPU memory", f"{run['peak_mem_gib']:.2f} GiB"))
    return rows


def data_rows(stats: dict[str, Any]) -> list[tuple[str, str]]:
    ls = stats["length_stats"]
    lengths = ", ".join(f"{k} {ls[k]}" for k in ("min", "median", "mean", "p95", "max") if k in ls)
    return [("rows read", str(stats["rows_read"])), ("rows used", str(stats["used"])),
            ("skipped (empty / non-text fields)", str(stats["skipped_bad"])),
            ("truncated to max_seq_length", str(stats["truncated"])), ("dropped (too long)", str(stats["dropped"])),
            ("token length", lengths), ("target (loss) tokens", str(ls.get("target_tokens", "-")))]


def answer_parts(entry: dict[str, Any], model: str) -> tuple[str, str, str]:
    """(thinking, answer, status line) of one model's generation."""
    ans = entry[model]
    score = ans.get("score", {})
    status = ("closed </think>" if ans["closed_think"] else "no </think>") + ", " + \
        ("stopped at EOS" if ans["stopped_at_eos"] else f"hit the {ans['new_tokens']}-token budget") + \
        f", {ans['new_tokens']} tokens" + (" — format ok" if score.get("ok") else "")
    return ans["thinking"], ans["answer"], status


# ----------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;
color:#1d1d1f;line-height:1.45}
h1{font-size:1.7em;margin-bottom:0}h2{border-bottom:2px solid #e5e5e5;padding-bottom:4px;margin-top:2em}
.sub{color:#666;margin-top:4px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:4px 10px;text-align:left;vertical-align:top}th{background:#f5f5f7}
td.n{text-align:right;font-variant-numeric:tabular-nums}.fig{max-width:100%;border:1px solid #eee;margin:6px 0}
.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}
.check{font-size:1.1em;margin:4px 0}.pair{display:grid;grid-template-columns:1fr 1fr;gap:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;background:#fafafa;min-width:0}
.card h4{margin:0 0 6px 0}pre{white-space:pre-wrap;word-wrap:break-word;margin:4px 0;font-size:.88em}
pre.think{max-height:24em;overflow:auto;background:#f0f4ff;border-left:3px solid #6b8cff;padding:6px}
pre.answer{background:#effaf1;border-left:3px solid #2da44e;padding:6px}
.label{font-size:.8em;text-transform:uppercase;color:#666;letter-spacing:.04em}.status{font-size:.82em;color:#555}
.q{font-weight:600;margin-top:1.4em}.grid{display:grid;grid-template-columns:1fr 1fr;gap:8px}.note{color:#666;font-size:.9em}
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def _table(header: list[str] | None, rows: list[list[str]] | list[tuple[str, str]], numeric_from: int = 1) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td{' class=n' if i >= numeric_from and header else ''}>{_e(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img class="fig" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _answer_card(title: str, thinking: str, answer: str, status: str) -> str:
    return (f'<div class="card"><h4>{_e(title)}</h4><div class="label">thinking</div><pre class="think">{_e(thinking or "(empty)")}'
            f'</pre><div class="label">answer</div><pre class="answer">{_e(answer or "(none)")}</pre>'
            f'<div class="status">{_e(status)}</div></div>')


def render_html(info: dict[str, Any], plots_dir: Path) -> str:
    run, parts = info["run"], []
    parts.append(f"<h1>thinktune run report</h1><p class=sub>{_e(run['output_dir'])} · generated {_e(info['created'])}</p>")
    checks = figure_checks(info["eval"], is_demo(info["config"]))
    parts.append("<h2>Did the tuning work?</h2>")
    if checks:
        for text, met in checks:
            mark = "" if met is None else '<span class="ok">✔ met</span>' if met else '<span class="bad">✘ not met</span>'
            parts.append(f'<p class="check">{_e(text)} {mark}</p>')
        if caveat := eval_caveat(info["eval"]):
            parts.append(f'<p class="check bad">caveat: {_e(caveat)}</p>')
    else:
        parts.append('<p class="note">No eval.json with base and tuned columns: run <code>thinktune eval --adapter '
                     f'{_e(run["output_dir"])}</code> and rebuild this report.</p>')
    if info["rl"]:
        parts.append(f'<p class="check">RL: {_e(rl_check_line(info["rl"]))}</p>')
    parts.append(f'<p class="check">{_e(info["spikes"])}</p>')
    parts.append("<h2>Run</h2>" + _table(None, [list(r) for r in run_rows(run)]))
    curves = [_img(plots_dir / f"{name}.png", title) for name, title in CURVES if f"{name}.png" in info["plots"]]
    parts.append('<h2>Training curves</h2><div class="grid">' + "".join(curves) + "</div>")
    if info["eval"]:
        ev = info["eval"]
        header, rows = table_rows(ev)
        parts.append(f"<h2>Evaluation: base vs tuned</h2><p class=note>{ev['rows']} held-out rows from {_e(ev['data'])}; "
                     f"greedy decoding, max_new_tokens {ev['max_new_tokens']}; lengths in {_e(ev['length_unit'])}; loss on "
                     f"{ev.get('loss_rows', ev['rows'])} rows tokenised as in training.</p>" + _table(header, rows))
    if info["rl"]:
        rl = info["rl"]
        parts.append(f"<h2>Reinforcement learning: held-out problems before vs after</h2><p class=note>greedy answers to "
                     f"{rl['problems']} held-out problems at step {rl['before_step']} and step {rl['after_step']}</p>"
                     + _table(["", f"step {rl['before_step']}", f"step {rl['after_step']}"], rl["rows"]))
        for ex in rl["examples"]:
            mark = "correct" if ex["correct"] else "wrong"
            parts.append(_answer_card(f"{ex['question']} (reference: {ex['reference']})", ex["thinking"], ex["answer"], mark))
        for sample in rl["samples"]:
            parts.append(f'<details><summary>sampled completion (reward {sample["reward"]:.3f}, reference '
                         f'{_e(sample["reference"])})</summary><pre class="answer">{_e(sample["completion"])}</pre></details>')
    if info["answers"]:
        parts.append(f"<h2>Answers to {len(info['answers'])} held-out questions</h2>")
        for entry in info["answers"]:
            cards = [_answer_card(m, *answer_parts(entry, m)) for m in ("base", "tuned") if m in entry]
            parts.append(f'<p class="q">Q: {_e(entry["question"])}</p><div class="pair">{"".join(cards)}</div>')
            ref = entry.get("reference")
            if ref:
                parts.append(f'<details><summary>reference answer</summary><pre class="answer">{_e(ref["answer"])}</pre></details>')
    parts.append("<h2>Data</h2>")
    if info["data"]:
        for stats in info["data"]:
            parts.append(f"<h3>{_e(stats['source'])}</h3>" + _table(None, [list(r) for r in data_rows(stats)]))
        if (plots_dir / HISTOGRAM).is_file():
            parts.append(_img(plots_dir / HISTOGRAM, "token length histogram"))
    else:
        parts.append(f'<p class="note">{_e(info["data_note"] or "no data statistics")}</p>')
    parts.append("<h2>Config</h2><pre>" + _e(yaml.safe_dump(info["config"], sort_keys=False, allow_unicode=True)) + "</pre>")
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>thinktune report: {_e(run['output_dir'])}"
            f"</title><style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


# ----------------------------------------------------------------------------- Markdown

def _md(text: Any) -> str:
    """Plain text for Markdown: '<' escaped so '</think>' shows instead of vanishing as an HTML tag."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;")


def _md_table(header: list[str], rows: list[list[str]] | list[tuple[str, str]]) -> str:
    cell = lambda c: _md(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def _md_quote(text: str) -> str:
    return "\n".join("> " + _md(line) for line in (text or "(empty)").splitlines()) or "> (empty)"


def render_markdown(info: dict[str, Any]) -> str:
    run, out = info["run"], []
    out.append(f"# thinktune run report\n\n`{run['output_dir']}` · generated {info['created']}\n")
    out.append("## Did the tuning work?\n")
    for text, met in figure_checks(info["eval"], is_demo(info["config"])):
        out.append(f"- {_md(text)}" + ("" if met is None else f" **{'met' if met else 'NOT met'}**"))
    if caveat := eval_caveat(info["eval"]):
        out.append(f"- **caveat:** {_md(caveat)}")
    if not info["eval"]:
        out.append(f"- no eval.json: run `thinktune eval --adapter {run['output_dir']}` and rebuild this report")
    if info["rl"]:
        out.append(f"- RL: {_md(rl_check_line(info['rl']))}")
    out.append(f"- {_md(info['spikes'])}\n")
    out.append("## Run\n\n" + _md_table(["", ""], run_rows(run)) + "\n")
    out.append("## Training curves\n")
    for name, title in CURVES:
        if f"{name}.png" in info["plots"]:
            out.append(f"![{title}]({PLOTS_DIR}/{name}.png)\n")
    if info["eval"]:
        ev = info["eval"]
        header, rows = table_rows(ev)
        out.append(f"## Evaluation: base vs tuned\n\n{ev['rows']} held-out rows from {ev['data']}; greedy decoding, "
                   f"max_new_tokens {ev['max_new_tokens']}; lengths in {ev['length_unit']}.\n\n" + _md_table(header, rows) + "\n")
    if info["rl"]:
        rl = info["rl"]
        out.append(f"## Reinforcement learning: held-out problems before vs after\n\ngreedy answers to {rl['problems']} "
                   f"held-out problems\n\n" + _md_table(["", f"step {rl['before_step']}", f"step {rl['after_step']}"],
                                                      rl["rows"]) + "\n")
        for ex in rl["examples"]:
            out.append(f"- {_md(ex['question'])} (reference {_md(ex['reference'])}): {_md(ex['answer'] or '(no answer)')} "
                       f"— {'correct' if ex['correct'] else 'wrong'}")
    if info["answers"]:
        out.append(f"## Answers to {len(info['answers'])} held-out questions\n")
        for entry in info["answers"]:
            out.append(f"### Q: {_md(entry['question'])}\n")
            for model in ("base", "tuned"):
                if model in entry:
                    thinking, answer, status = answer_parts(entry, model)
                    out.append(f"**{model}** ({_md(status)})\n\n*thinking:*\n\n{_md_quote(thinking)}\n\n*answer:*\n\n{_md_quote(answer)}\n")
    out.append("## Data\n")
    if info["data"]:
        for stats in info["data"]:
            out.append(f"### {stats['source']}\n\n" + _md_table(["", ""], data_rows(stats)) + "\n")
        out.append(f"![token lengths]({PLOTS_DIR}/{HISTOGRAM})\n")
    else:
        out.append(f"{info['data_note'] or 'no data statistics'}\n")
    out.append("## Config\n\n```yaml\n" + yaml.safe_dump(info["config"], sort_keys=False, allow_unicode=True) + "```\n")
    return "\n".join(out)


# ----------------------------------------------------------------------------- entry point

def build_report(output_dir: str | Path, answers: int = 3, with_data: bool = True,
                 log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """Write output_dir/report.html and report.md; return their paths."""
    folder = Path(output_dir)
    info = collect(folder, answers, with_data)
    html_path, md_path = folder / HTML_FILE, folder / MD_FILE
    html_path.write_text(render_html(info, folder / PLOTS_DIR), encoding="utf-8")
    md_path.write_text(render_markdown(info), encoding="utf-8")
    if not info["eval"]:
        log(f"note: {folder / EVAL_FILE} not found; the report has no base-vs-tuned section (run thinktune eval first)")
    return html_path, md_path


def report_command(args: Any) -> int:
    """`thinktune report OUTPUT_DIR [--answers N] [--no-data]`."""
    for path in build_report(args.output_dir, args.answers, not args.no_data):
        print(f"wrote {path}")
    return 0
