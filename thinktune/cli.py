"""The `thinktune` command: one entry point mapping subcommands to plain functions.

Errors the user can fix (`UserError`) print one line and exit 2; `--debug` shows the
traceback. This module holds argument parsing and printing only.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import warnings
import traceback
from pathlib import Path
from typing import Any, Callable

from thinktune.errors import TrainingStopped, UserError


def cmd_train(args: argparse.Namespace) -> int:
    from thinktune.config import load_config
    from thinktune.distributed import launch, under_torchrun

    cfg = load_config(args.config, args.overrides)
    if args.gpus is not None and args.gpus > 1 and not under_torchrun():
        argv = ["train", args.config, *args.overrides] + (["--resume", args.resume] if args.resume else [])
        return launch(args.gpus, (["--debug"] if args.debug else []) + argv, cfg)
    from thinktune.loop import train

    again = shlex.join(["thinktune", "train", args.config, *args.overrides, "--resume", "latest"])
    summary = train(cfg, resume=args.resume, command=again)
    return 0 if summary else 1


def cmd_validate(args: argparse.Namespace) -> int:
    from thinktune.config import explain, load_config

    if args.explain:
        print(explain())
        return 0
    if not args.config:
        raise UserError("validate needs a CONFIG (or --explain)")
    cfg = load_config(args.config, args.overrides)
    print(json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False))
    print(f"{args.config}: valid", file=sys.stderr)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from thinktune.config import load_config
    from thinktune.data import PromptFormat, build_examples, length_histogram, load_samples, render_loss_span
    from thinktune.model import load_tokenizer, resolve_source

    cfg = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(resolve_source(cfg.model), cfg.model.trust_remote_code)
    fmt = PromptFormat(cfg.data.template, tokenizer)
    samples, report = load_samples(cfg.data.path, cfg.data)
    examples = build_examples(samples, fmt, tokenizer, cfg.data, report)
    for i, ex in enumerate(examples[: args.examples]):
        print(f"----- example {i + 1} (loss on [[LOSS> ... <LOSS]], {ex.num_target_tokens}/{len(ex.input_ids)} tokens) -----")
        print(render_loss_span(ex, tokenizer))
    print("----- statistics -----")
    print(report.summary())
    stats = report.length_stats()
    print("token lengths: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    print(f"max_seq_length {cfg.data.max_seq_length}, overlong policy: {cfg.data.overlong}, train_on: {cfg.data.train_on}")
    print(length_histogram(report.lengths))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from thinktune.generation import generate, read_questions

    questions = list(args.questions)
    if args.file:
        questions += read_questions(args.file)
    if not questions:
        raise UserError('give a question ("...") or --file questions.jsonl')
    results = generate(questions, adapter=args.adapter, base=args.base, template=args.template,
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature, compare=args.compare,
                       stream=not args.no_stream)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results), encoding="utf-8")
        print(f"wrote {len(results)} answers to {args.out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from thinktune.export import merge

    out = merge(args.adapter, args.out, dtype=args.dtype, base=args.base)
    print(f"merged model written to {out} (load it with AutoModelForCausalLM.from_pretrained('{out}'))")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from thinktune.demo import run_demo

    return run_demo(args.out, overrides=args.overrides, overwrite=args.overwrite, questions=args.questions)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thinktune", description="LoRA/QLoRA fine-tuning of reasoning LLMs on chain-of-thought data")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train adapters: thinktune train CONFIG.yaml [key.path=value ...] [--resume latest|PATH]")
    p.add_argument("config", help="YAML file or shipped config name (demo, r1-medical-zh, r1-medical-zh-qlora)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.lr=1e-4")
    p.add_argument("--resume", metavar="latest|PATH", help="continue from the newest checkpoint in output_dir, or from PATH")
    p.add_argument("--gpus", type=int, metavar="N", help="N processes on this host through torchrun (DDP, or FSDP2 with "
                   "train.distributed=fsdp); several hosts: torchrun --nnodes ... -m thinktune train CONFIG")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="check a config and print it resolved")
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--explain", action="store_true", help="list every key with its default and meaning")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("data", help="preview formatted examples (loss span marked) and token-length statistics")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--examples", type=int, default=2)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("generate", help="answer questions with base or base + adapter")
    p.add_argument("questions", nargs="*")
    p.add_argument("--adapter", help="adapter folder (output_dir or a checkpoint-N)")
    p.add_argument("--base", help="base model (hub id, folder, .gguf, embedded:smollm2); default: the adapter's")
    p.add_argument("--file", help="questions, one per line or JSONL with 'question'")
    p.add_argument("--out", help="write answers as JSONL")
    p.add_argument("--compare", action="store_true", help="show base and tuned answers side by side")
    p.add_argument("--template", choices=["seed-zh", "seed-en", "chat"], help="default: the adapter's training template")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (R1 authors suggest 0.6 with sampling)")
    p.add_argument("--no-stream", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("merge", help="merge an adapter into its base and save a 16-bit model")
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--base", help="override the base model")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("demo", help="offline CPU demo: tune SmolLM2-135M on the sample data, show before/after")
    p.add_argument("--out", default="demo-output")
    p.add_argument("--overwrite", action="store_true", help="train again even if --out holds a finished demo")
    p.add_argument("--questions", type=int, default=3, help="held-out questions to show before/after")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_demo)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Callable[[Any], None]]:
    """Commands of later stages (eval, plot, report, estimate) register their own arguments here."""
    from thinktune import cli_extra

    return cli_extra.REGISTRY


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
        return int(args.func(args) or 0)
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
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
