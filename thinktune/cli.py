"""The `thinktune` command: one table (`COMMANDS`) mapping each subcommand to its arguments and to
the function in its stage's module that runs it.

Errors the user can fix (`UserError`) print one line and exit 2; `--debug` shows the
traceback. This module holds argument parsing and error printing only: it never trains,
loads a model or reads data itself.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
import warnings
from dataclasses import dataclass
from typing import Callable

from thinktune.errors import TrainingStopped, UserError
from thinktune.gguf_export import add_arguments as export_arguments  # light: no torch, numpy or fastapi
from thinktune.serve import add_arguments as serve_arguments


def trust_argument(p: argparse.ArgumentParser) -> None:
    """The user's switch for a model's or tokenizer's own Python code (a saved config never sets it)."""
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped with the base model or tokenizer (off: a saved config in the "
                        "adapter folder can never switch it on)")


def train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML file or shipped config name (demo, r1-medical-zh, r1-medical-zh-qlora)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.lr=1e-4")
    p.add_argument("--resume", metavar="latest|PATH", help="continue from the newest checkpoint in output_dir, or from PATH")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the earlier run in output_dir (what thinktune wrote only; = output.overwrite=true)")
    p.add_argument("--gpus", type=int, metavar="N", help="N processes on this host through torchrun (DDP, or FSDP2 with "
                   "train.distributed=fsdp); several hosts: torchrun --nnodes ... -m thinktune train CONFIG")


def validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML file or shipped config name; with --explain: explain that config")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.lr=1e-4")
    p.add_argument("--explain", action="store_true",
                   help="every key with its value and meaning (CONFIG's values, else the defaults)")


def data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML file or shipped config name")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. data.max_seq_length=1024")
    p.add_argument("--examples", type=int, default=2, help="formatted rows to print")


def generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("questions", nargs="*", help="questions to answer (quote each one)")
    p.add_argument("--adapter", help="adapter folder (output_dir or a checkpoint-N)")
    p.add_argument("--base", help="base model (hub id, folder, .gguf, embedded:smollm2); default: the adapter's")
    p.add_argument("--file", help="questions, one per line or JSONL with 'question'")
    p.add_argument("--out", help="write answers as JSONL")
    p.add_argument("--compare", action="store_true", help="show base and tuned answers side by side")
    p.add_argument("--template", choices=TEMPLATES, help="default: the adapter's training template")
    p.add_argument("--max-new-tokens", type=int, default=512, help="generation budget per answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (R1 authors suggest 0.6 with sampling)")
    p.add_argument("--no-stream", action="store_true", help="print each answer when it is complete (--file never streams)")
    trust_argument(p)


def merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, help="adapter folder (output_dir or a checkpoint-N)")
    p.add_argument("--out", required=True, help="new folder for the merged model (must not hold files)")
    p.add_argument("--base", help="override the base model")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="dtype of the saved weights")
    trust_argument(p)


def demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-output", help="folder for the demo's adapter, metrics, plots and report")
    p.add_argument("--overwrite", action="store_true", help="train again even if --out holds a finished demo")
    p.add_argument("--questions", type=int, metavar="N",
                   help="answer only the first N test questions (the loss still uses all; default: all 10); 3 are shown")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides of the demo config, e.g. train.max_steps=8")


def eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="run config (its output_dir is the adapter; its eval data the questions)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides of CONFIG")
    p.add_argument("--adapter", help="adapter folder (output_dir or checkpoint-N); default: CONFIG's output_dir")
    p.add_argument("--base", help="base model; alone: evaluate the base model only")
    p.add_argument("--data", help="held-out rows (file or sample:NAME); default: the run's eval data")
    p.add_argument("--template", choices=TEMPLATES, help="default: the run's template")
    p.add_argument("--n", type=int, help="evaluate only the first N rows")
    p.add_argument("--max-new-tokens", type=int, help="generation budget (default: 1.5x the longest reference)")
    p.add_argument("--batch-size", type=int, help="rows per loss batch (default: train.batch_size)")
    p.add_argument("--no-base", action="store_true", help="skip the base column")
    p.add_argument("--loss-only", action="store_true", help="skip the generations")
    p.add_argument("--out", help="JSON file (default: OUTPUT_DIR/eval.json for a run's folder, else ./eval.json)")
    trust_argument(p)


def init_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="shipped config to start from (demo, r1-medical-zh, r1-medical-zh-qlora)")
    p.add_argument("path", nargs="?", help="where to write it (default: NAME.yaml in the current folder)")
    p.add_argument("--force", action="store_true", help="replace PATH if it exists")


def plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output_dir", help="a run's output_dir (holds metrics.jsonl)")


def report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output_dir", help="a run's output_dir (holds metrics.jsonl; eval.json from thinktune eval if run)")
    p.add_argument("--answers", type=int, default=3, help="held-out answers to show, base vs tuned (from eval.json)")
    p.add_argument("--no-data", action="store_true", help="skip re-reading the data for its statistics")


def estimate_arguments(p: argparse.ArgumentParser) -> None:
    from thinktune.memory.estimate import CHECKPOINTING, MODES  # arithmetic only: no torch
    from thinktune.memory.shapes import PRESETS

    p.add_argument("model", nargs="?", help=f"preset ({', '.join(PRESETS)}), hub id in the local cache, folder or config.json")
    p.add_argument("--mode", choices=[*MODES, "full"], help="default: lora (qlora when the config loads in 4-bit); full = full fine-tuning (every weight "
                   "trained: weights + grads + AdamW states + fp32 master copy for 16-bit weights)")
    p.add_argument("--batch", type=int, help="rows per micro-batch (default: the config's, 2)")
    p.add_argument("--seq", type=int, help="tokens per row (default: data.max_seq_length, 2048)")
    p.add_argument("--r", type=int, help="LoRA rank (default 16)")
    p.add_argument("--targets", type=lambda s: [t for t in s.split(",") if t], help="comma-separated LoRA targets")
    p.add_argument("--optimizer", choices=["adamw", "adamw_8bit"], help="default: the config's (adamw_8bit)")
    p.add_argument("--checkpointing", choices=CHECKPOINTING, help="gradient checkpointing (default: on)")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction,
                   help="padding-free packed rows (default: the config's, auto = packed on the fast path)")
    p.add_argument("--fast-path", choices=["auto", "on", "off"], help="thinktune's fused path (default: auto)")
    p.add_argument("--config", help="read model/lora/data/train from a thinktune YAML (flags override it)")
    p.add_argument("--gpu-gib", type=float, help="memory budget for --checkpointing auto (default: smallest card that fits)")
    p.add_argument("--json", action="store_true", help="print the breakdown as JSON")


TEMPLATES = ["seed-zh", "seed-en", "chat"]


class HelpWithDefaults(argparse.HelpFormatter):
    """Each argument's help ends with its default, unless the default is empty (None/False) or already stated."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


@dataclass(frozen=True)
class Command:
    """One subcommand: its arguments (here) and the function that runs it (in its stage's module)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: str
    """"module:function", imported only when the command runs (so `thinktune --help` loads no torch)."""


COMMANDS = (
    Command("train", "train adapters: thinktune train CONFIG.yaml [key.path=value ...] [--resume latest|PATH]",
            train_arguments, "thinktune.loop:train_command"),
    Command("validate", "check a config (keys, data files, device) and print it resolved; --explain: what each key means",
            validate_arguments, "thinktune.starter:validate_command"),
    Command("init", "write a shipped config as commented YAML to edit: thinktune init r1-medical-zh my-run.yaml",
            init_arguments, "thinktune.starter:init_command"),
    Command("data", "preview formatted examples (loss span marked) and token-length statistics", data_arguments,
            "thinktune.setup:preview_data"),
    Command("generate", "answer questions with base or base + adapter", generate_arguments,
            "thinktune.generation:generate_command"),
    Command("merge", "merge an adapter into its base and save a 16-bit model", merge_arguments,
            "thinktune.export:merge_command"),
    Command("demo", "offline CPU demo: tune SmolLM2-135M on the sample data, show before/after", demo_arguments,
            "thinktune.demo:demo_command"),
    Command("eval", "held-out loss/perplexity and format compliance, base vs tuned", eval_arguments,
            "thinktune.evaluation:eval_command"),
    Command("plot", "write PNG training curves into OUTPUT_DIR/plots/", plot_arguments, "thinktune.plotting:plot_command"),
    Command("report", "write OUTPUT_DIR/report.html (self-contained) and report.md", report_arguments,
            "thinktune.reporting:report_command"),
    Command("estimate", "how much GPU memory a model/mode/batch needs (no model: the R1 table)", estimate_arguments,
            "thinktune.memory.advice:estimate_command"),
    Command("export", "write a GGUF (f16/bf16/q8_0) + Ollama Modelfile from an adapter or a merged folder",
            export_arguments, "thinktune.gguf_export:export_command"),
    Command("serve", "OpenAI-compatible server over one base and its adapters (thinking in reasoning_content)",
            serve_arguments, "thinktune.serve:serve_command"),
)


def build_parser() -> argparse.ArgumentParser:
    from thinktune import __version__

    parser = argparse.ArgumentParser(prog="thinktune", description="LoRA/QLoRA fine-tuning of reasoning LLMs on chain-of-thought data")
    parser.add_argument("--version", action="version", version=f"thinktune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help,
                           formatter_class=HelpWithDefaults)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def run_command(target: str, args: argparse.Namespace) -> int:
    """Import "module:function" and call it with the parsed arguments."""
    module, function = target.split(":")
    return int(getattr(importlib.import_module(module), function)(args) or 0)


def quiet_libraries() -> None:
    """Hide library chatter that says nothing to a user (loading bars, deprecation notes, bnb's CPU kernel hint)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.debug:
        quiet_libraries()
    try:
        return run_command(args.run, args)
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except TrainingStopped as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: quit without saving", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
