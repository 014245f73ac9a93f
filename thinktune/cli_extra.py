"""Subcommands of the later stages (eval, plot, report, estimate): each module's `register(subparsers)`."""
from __future__ import annotations

from typing import Any, Callable

REGISTRY: list[Callable[[Any], None]] = []


# ----------------------------------------------------------------------------- eval, plot, report (issue 5)
# Parsing only; the work is in thinktune.evaluate / plot / report, imported when the command runs
# (so `thinktune --help` does not pay for torch).

def register_eval(subparsers: Any) -> None:
    p = subparsers.add_parser("eval", help="held-out loss/perplexity and format compliance, base vs tuned")
    p.add_argument("config", nargs="?", help="run config (its output_dir is the adapter; its eval data the questions)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides of CONFIG")
    p.add_argument("--adapter", help="adapter folder (output_dir or checkpoint-N); default: CONFIG's output_dir")
    p.add_argument("--base", help="base model; alone: evaluate the base model only")
    p.add_argument("--data", help="held-out rows (file or sample:NAME); default: the run's eval data")
    p.add_argument("--template", choices=["seed-zh", "seed-en", "chat"], help="default: the run's template")
    p.add_argument("--n", type=int, help="evaluate only the first N rows")
    p.add_argument("--max-new-tokens", type=int, help="generation budget (default: 1.5x the longest reference)")
    p.add_argument("--batch-size", type=int, help="rows per loss batch (default: train.batch_size)")
    p.add_argument("--no-base", action="store_true", help="skip the base column")
    p.add_argument("--loss-only", action="store_true", help="skip the generations")
    p.add_argument("--out", help="JSON file (default: OUTPUT_DIR/eval.json for a run's folder, else ./eval.json)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: Any) -> int:
    from thinktune.evaluate import default_out, format_table, learning_figures, run_eval

    out = args.out or default_out(args.config, args.overrides, args.adapter)
    result = run_eval(args.config, args.adapter, args.base, args.data, args.n, args.max_new_tokens, args.template,
                      args.batch_size, not args.no_base, not args.loss_only, out, args.overrides)
    print("\n" + format_table(result))
    for line in learning_figures(result):
        print(line)
    print(f"wrote {out}")
    return 0


def register_plot(subparsers: Any) -> None:
    p = subparsers.add_parser("plot", help="write PNG training curves into OUTPUT_DIR/plots/")
    p.add_argument("output_dir", help="a run's output_dir (holds metrics.jsonl)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: Any) -> int:
    from thinktune.plot import plot_run

    for path in plot_run(args.output_dir):
        print(f"wrote {path}")
    return 0


def register_report(subparsers: Any) -> None:
    p = subparsers.add_parser("report", help="write OUTPUT_DIR/report.html (self-contained) and report.md")
    p.add_argument("output_dir", help="a run's output_dir (holds metrics.jsonl; eval.json from thinktune eval if run)")
    p.add_argument("--answers", type=int, default=3, help="held-out answers to show, base vs tuned (from eval.json)")
    p.add_argument("--no-data", action="store_true", help="skip re-reading the data for its statistics")
    p.set_defaults(func=cmd_report)


def cmd_report(args: Any) -> int:
    from thinktune.report import build_report

    for path in build_report(args.output_dir, args.answers, not args.no_data):
        print(f"wrote {path}")
    return 0


REGISTRY += [register_eval, register_plot, register_report]


# ----------------------------------------------------------------------------- estimate (issue 7)
# thinktune.preflight imports no torch at module level (the arithmetic is in thinktune.estimate).

def register_estimate(subparsers: Any) -> None:
    from thinktune.preflight import register

    register(subparsers)


REGISTRY.append(register_estimate)
