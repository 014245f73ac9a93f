"""GRPO step speed and memory: thinktune's objective against TRL's GRPOTrainer, on the 7B architecture.

One GRPO step = sample G=8 completions of 512 tokens for one prompt on the weights being trained,
score them, then forward + backward + AdamW on prompt + completion. The model is a random-init
DeepSeek-R1-Distill-Qwen-7B (bench/r1_distill_qwen_7b.json, built by bench_train.build_model); its
random weights practically never sample EOS, so every completion runs to rl.max_completion_tokens
(the completion tokens actually sampled are counted, not assumed). LoRA r16, alpha 16, dropout 0 on
all 7 projections; gradient checkpointing on in every row (TRL's GRPOConfig default, and
train.gradient_checkpointing: true as configs/r1-medical-grpo.yaml ships); beta 0 (no reference
forward, TRL's default), token-level loss normalisation, truncated completions not masked (TRL's
default; with random weights every completion is truncated). The reward is the same deterministic
function of the completion text for both (it varies within a group, so no group is dropped).

Rows (one fresh process each, `--row NAME`; the driver runs them in turn under a deadline):

- tt_bf16: thinktune's own path -- setup.prepare_model, rl.objective.build_grpo (the rollout batch
  source + GRPOObjective) and loop.Trainer (its optimizer and step.TrainStep), exactly what
  `thinktune train` builds for train.objective=grpo; bf16 weights, bf16 autocast.
- tt_4bit: the same on an NF4 base (bitsandbytes, double quantisation; bench_train.quantize_nf4_).
- trl_bf16: TRL's GRPOTrainer, transformers-generation path (use_vllm=False), same G, completion
  length, LoRA (peft_config), reward, bf16, gradient checkpointing (its default). Rollout time is
  measured by a GRPOTrainer subclass that times `_generate_single_turn` (the `model.generate` call
  and its post-processing) and `_generate_and_score_completions`; the step by a TrainerCallback.

Per row: rollout tokens/s (completion tokens sampled / seconds in sampling), training tokens/s
(prompt + completion tokens through forward + backward + optimizer / seconds of the training
part), whole-step seconds (rollout + scoring + training), peak allocated GiB (after the base is
built), first-step seconds (the warm-up step). 1 warm-up step, then up to --steps timed steps
while they fit the row's time budget (medians reported).

  GPU:  python bench/bench_rl.py [--rows tt_bf16,trl_bf16,tt_4bit] [--deadline-s 240] [--out DIR]
  CPU:  python bench/bench_rl.py --tiny      # tiny random Qwen2, G=2, 8 completion tokens, same code paths

Writes JSON to --out (default $OUT or bench-out/) and prints the table last. Not collected by pytest.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
for entry in (str(HERE.parent), str(HERE)):  # the repository (thinktune) and bench/ (bench_train, this module)
    if entry not in sys.path:
        sys.path.insert(0, entry)

from bench_train import CONFIG_7B, GIB, SEVEN, build_model, quantize_nf4_, sync  # noqa: E402

ROWS = {
    "tt_bf16": "thinktune GRPO, bf16, gradient checkpointing",
    "trl_bf16": "TRL GRPOTrainer (transformers generate), bf16, gradient checkpointing",
    "tt_4bit": "thinktune GRPO, QLoRA NF4, gradient checkpointing",
}
TINY_OVERRIDES = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "vocab_size": 512}
QUESTION_WORDS = 120  # ~160-token prompts after the seed-en template
PROMPTS = 16
REWARD_SPEC = "bench_rl:varied_reward"


# ----------------------------------------------------------------------------- shared workload

def varied_reward(prompt: str, completion: str, reference: str, **row: Any) -> float:
    """A deterministic reward in [0, 1) that differs between completions (random weights never earn a real one)."""
    return (zlib.crc32(completion.encode("utf-8")) % 1000) / 1000


def trl_varied_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """The same reward in TRL's calling convention."""
    return [varied_reward(p, c, "") for p, c in zip(prompts, completions)]


def build_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer covering the model's whole vocabulary (no hub): ids decode to 'w<id>' words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token="<|im_start|>")
    fast.add_tokens(["<think>", "</think>"])
    return fast


def questions(vocab_size: int, count: int, words: int) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(6, vocab_size, (count, words), generator=gen)
    return [" ".join(f"w{i}" for i in row.tolist()) for row in ids]


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    return out


# ----------------------------------------------------------------------------- one row, in its own process

class RowClock:
    """The row's time budget: is there time for one more step of `last_s` seconds?"""

    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.perf_counter(), budget_s

    def fits(self, last_s: float) -> bool:
        return time.perf_counter() - self.start + 1.15 * last_s + 3.0 < self.budget_s


def summarise(record: dict, steps: list[dict]) -> None:
    """Medians over the timed steps (or the warm-up step alone, marked, when none fitted)."""
    timed = [s for s in steps if not s["warmup"]] or steps[:1]
    record["timed_steps"] = sum(not s["warmup"] for s in steps)
    record["first_step_s"] = steps[0]["step_s"] if steps else None
    if not timed:
        return
    for key in ("rollout_tokens_per_s", "train_tokens_per_s", "step_s", "rollout_s", "train_s"):
        values = [s[key] for s in timed if s.get(key) is not None]
        record[key] = statistics.median(values) if values else None
    record["completion_tokens"] = timed[-1]["completion_tokens"]
    record["train_tokens"] = timed[-1]["train_tokens"]


def thinktune_row(name: str, args: argparse.Namespace, device: torch.device, record: dict, write: Any) -> None:
    from thinktune.config import config_from_dict
    from thinktune.data import PromptFormat
    from thinktune.loop import Trainer
    from thinktune.rl.objective import build_grpo
    from thinktune.rl.problems import Problem
    from thinktune.setup import Run, prepare_model

    clock = RowClock(args.budget_s)
    model = build_model(CONFIG_7B, device, torch.float32 if args.tiny else torch.bfloat16,
                        TINY_OVERRIDES if args.tiny else None)
    model.config.use_cache = True  # as from_pretrained gives it; the training forward passes use_cache=False
    if name == "tt_4bit":
        quantize_nf4_(model)
    tokenizer = build_tokenizer(model.config.vocab_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cfg = config_from_dict({
        "lora": {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": SEVEN},
        "data": {"template": "seed-en"},
        "train": {"objective": "grpo", "batch_size": 1, "grad_accum": 1, "lr": 1e-5, "optimizer": "adamw",
                  "precision": "fp32" if args.tiny else "bf16", "gradient_checkpointing": True,
                  "max_grad_norm": 1.0, "seed": 0, "max_steps": args.warmup + args.steps},
        "rl": {"group_size": args.group, "max_completion_tokens": args.completion_tokens, "temperature": 1.0,
               "top_p": 1.0, "rewards": [REWARD_SPEC], "reward_weights": [1.0], "beta": 0.0,
               "loss_normalization": "token", "mask_truncated_completions": False},
    })
    log: list[str] = []
    peft_model, fast = prepare_model(cfg, model, device, log.append)
    fmt = PromptFormat(cfg.data.template, tokenizer)
    problems = [Problem(q, "w7") for q in questions(model.config.vocab_size, PROMPTS, args.question_words)]
    run = Run(cfg, None, tokenizer, fmt, [], [], [], peft_model, device, fast, problems, [])  # type: ignore[arg-type]
    objective, batches = build_grpo(run)
    trainer = Trainer(run, objective, batches, log.append)
    record["path"] = "fast" if fast is not None else "plain"
    record["log"] = log[-6:]
    record["trainable"] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    record["setup_s"] = round(time.perf_counter() - clock.start, 1)
    steps: list[dict] = []
    position = 0
    while len(steps) < args.warmup + args.steps:
        sync(device)
        t0 = time.perf_counter()
        micro = trainer.stream.for_step(position)
        sync(device)
        t1 = time.perf_counter()
        result = trainer.step_fn(micro, lr=cfg.train.lr)
        sync(device)
        t2 = time.perf_counter()
        position += trainer.stream.per_step
        stats = trainer.stream.take_stats()
        if result.skipped:
            raise RuntimeError("non-finite GRPO step")
        steps.append({"warmup": len(steps) < args.warmup, "step_s": t2 - t0, "rollout_s": stats.rollout_seconds,
                      "train_s": t2 - t1, "completion_tokens": stats.completion_tokens,
                      "train_tokens": result.real_tokens, "zero_variance_groups": stats.zero_variance_groups,
                      "rollout_tokens_per_s": stats.completion_tokens / stats.rollout_seconds,
                      "train_tokens_per_s": result.real_tokens / (t2 - t1), "loss": result.loss})
        record["steps"] = steps
        summarise(record, steps)
        record["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
        write(record)
        if len(steps) >= args.warmup and not clock.fits(steps[-1]["step_s"]):
            record["note"] = "time budget: fewer timed steps"
            break
    record["timing"] = "rollout = thinktune.rl.rollout.sample (rollout_seconds); train = TrainStep"


def trl_row(args: argparse.Namespace, device: torch.device, record: dict, write: Any) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from thinktune.data import PromptFormat

    clock = RowClock(args.budget_s)
    model = build_model(CONFIG_7B, device, torch.float32 if args.tiny else torch.bfloat16,
                        TINY_OVERRIDES if args.tiny else None)
    model.config.use_cache = True
    tokenizer = build_tokenizer(model.config.vocab_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fmt = PromptFormat("seed-en", tokenizer)
    prompts = [fmt.prompt(q) for q in questions(model.config.vocab_size, PROMPTS, args.question_words)]
    steps: list[dict] = []
    current: dict[str, float] = {}

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with its generation and rollout phases timed (nothing else changed)."""

        def _generate_single_turn(self, prompt_ids, *rest, **kwargs):  # type: ignore[override]
            sync(device)
            t0 = time.perf_counter()
            out = super()._generate_single_turn(prompt_ids, *rest, **kwargs)
            sync(device)
            current["generate_s"] = current.get("generate_s", 0.0) + time.perf_counter() - t0
            current["completion_tokens"] = current.get("completion_tokens", 0) + sum(len(c) for c in out[0])
            current["prompt_tokens"] = current.get("prompt_tokens", 0) + sum(len(p) for p in prompt_ids)
            return out

        def _generate_and_score_completions(self, inputs):  # type: ignore[override]
            sync(device)
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            sync(device)
            current["rollout_phase_s"] = current.get("rollout_phase_s", 0.0) + time.perf_counter() - t0
            return out

    class StepClock(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kwargs):
            current.clear()
            sync(device)
            current["t0"] = time.perf_counter()

        def on_step_end(self, targs, state, control, **kwargs):
            sync(device)
            step_s = time.perf_counter() - current["t0"]
            rollout_phase = current.get("rollout_phase_s", 0.0)
            train_s = step_s - rollout_phase
            train_tokens = current.get("prompt_tokens", 0) + current.get("completion_tokens", 0)
            steps.append({"warmup": len(steps) < args.warmup, "step_s": step_s, "rollout_s": current.get("generate_s"),
                          "rollout_phase_s": rollout_phase, "train_s": train_s,
                          "completion_tokens": current.get("completion_tokens", 0), "train_tokens": train_tokens,
                          "rollout_tokens_per_s": current.get("completion_tokens", 0) / current["generate_s"]
                          if current.get("generate_s") else None,
                          "train_tokens_per_s": train_tokens / train_s if train_s > 0 else None})
            record["steps"] = steps
            summarise(record, steps)
            record["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
            write(record)
            if len(steps) >= args.warmup and not clock.fits(step_s):
                record["note"] = "time budget: fewer timed steps"
                control.should_training_stop = True
            return control

    out_dir = tempfile.mkdtemp(prefix="bench-rl-trl-")
    config = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=args.group, gradient_accumulation_steps=1,
        num_generations=args.group, max_completion_length=args.completion_tokens, max_steps=args.warmup + args.steps,
        learning_rate=1e-5, lr_scheduler_type="constant", max_grad_norm=1.0, temperature=1.0, top_p=1.0,
        beta=0.0, loss_type="dapo", mask_truncated_completions=False, use_vllm=False, bf16=not args.tiny,
        gradient_checkpointing=True, use_cpu=args.tiny, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, seed=0, dataloader_num_workers=0, log_completions=False,
    )
    lora = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=16, lora_dropout=0.0, target_modules=SEVEN)
    trainer = TimedGRPOTrainer(model=model, reward_funcs=trl_varied_reward, args=config,
                               train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
                               peft_config=lora, callbacks=[StepClock()])
    record["trainable"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    record["setup_s"] = round(time.perf_counter() - clock.start, 1)
    record["timing"] = ("rollout = GRPOTrainer._generate_single_turn (model.generate + post-processing); "
                        "train = step - _generate_and_score_completions (forward + backward + optimizer)")
    trainer.train()
    if not steps:
        raise RuntimeError("TRL ran no step")


def run_row(args: argparse.Namespace) -> int:
    device = torch.device("cpu") if args.tiny else torch.device("cuda", 0)
    record: dict[str, Any] = {"row": args.row, "about": ROWS[args.row], "tiny": args.tiny, "group": args.group,
                              "completion_tokens_max": args.completion_tokens,
                              "card": "cpu" if args.tiny else torch.cuda.get_device_name(device)}
    path = Path(args.out) / f"row_{args.row}.json"

    def write(rec: dict) -> None:
        path.write_text(json.dumps(rec, indent=2, default=str))

    write(record)  # the card is known even if the row is killed before its first step
    try:
        if args.row == "trl_bf16":
            trl_row(args, device, record, write)
        else:
            thinktune_row(args.row, args, device, record, write)
    except Exception as exc:  # recorded: the driver prints what the other rows measured
        record["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        traceback.print_exc()
    write(record)
    print(json.dumps({k: v for k, v in record.items() if k not in ("steps", "log")}, default=str), flush=True)
    return 1 if "error" in record else 0


# ----------------------------------------------------------------------------- the driver

def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def ratios(results: list[dict]) -> dict[str, float | None]:
    """thinktune bf16 over TRL bf16: rollout and training tokens/s, whole step (TRL's seconds / ours)."""
    tt = next((r for r in results if r["row"] == "tt_bf16"), {})
    trl = next((r for r in results if r["row"] == "trl_bf16"), {})
    return {"rollout": ratio(tt.get("rollout_tokens_per_s"), trl.get("rollout_tokens_per_s")),
            "whole_step": ratio(trl.get("step_s"), tt.get("step_s")),
            "training": ratio(tt.get("train_tokens_per_s"), trl.get("train_tokens_per_s"))}


def table(results: list[dict], card: str) -> str:
    lines = [f"card: {card}",
             f"{'row':<9} {'rollout tok/s':>13} {'train tok/s':>11} {'step s':>7} {'peak GiB':>9} {'first s':>8} "
             f"{'timed':>5}  note"]
    for r in results:
        if r.get("step_s"):
            peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") else "-"
            roll = f"{r['rollout_tokens_per_s']:,.0f}" if r.get("rollout_tokens_per_s") else "-"
            train = f"{r['train_tokens_per_s']:,.0f}" if r.get("train_tokens_per_s") else "-"
            note = "warm-up step only" if not r.get("timed_steps") else r.get("note", "")
            lines.append(f"{r['row']:<9} {roll:>13} {train:>11} {r['step_s']:>7.2f} {peak:>9} "
                         f"{r['first_step_s']:>8.2f} {r['timed_steps']:>5}  {(note + ' ' + r.get('error', '')).strip()[:80]}")
        else:
            lines.append(f"{r['row']:<9} {'-':>13} {'-':>11} {'-':>7} {'-':>9} {'-':>8} {'-':>5}  "
                         f"{r.get('error', 'no step finished')[:80]}")
    x = ratios(results)
    roll, step, train = x["rollout"], x["whole_step"], x["training"]
    fmt = lambda v: f"{v:.2f}x" if v else "-"  # noqa: E731
    lines.append(f"thinktune/TRL (bf16): rollout {fmt(roll)}, whole step {fmt(step)}, training {fmt(train)} "
                 f"(targets: rollout >= 3x, whole step >= 2x)")
    q = next((r for r in results if r["row"] == "tt_4bit"), {})
    if q.get("peak_gib"):
        lines.append(f"QLoRA GRPO step peak: {q['peak_gib']:.2f} GiB (target <= 12 GiB)")
    return "\n".join(lines)


def drive(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in args.rows.split(",") if r]
    if args.tiny:
        rows = [r for r in rows if r != "tt_4bit"]  # bitsandbytes NF4 needs CUDA
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        print(f"error: unknown rows {unknown}; choose from {', '.join(ROWS)}", file=sys.stderr)
        return 2
    results: list[dict] = []
    for row in rows:
        left = args.deadline_s - (time.perf_counter() - start)
        limit = min(args.row_s, left)
        path = out_dir / f"row_{row}.json"
        path.unlink(missing_ok=True)
        if limit < args.min_row_s:
            results.append({"row": row, "error": "skipped: the driver's deadline"})
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--row", row, "--out", str(out_dir),
               "--budget-s", f"{limit - 4:.0f}", "--steps", str(args.steps), "--warmup", str(args.warmup)]
        cmd += ["--tiny"] if args.tiny else []
        print(f"== {row}: {ROWS[row]} (limit {limit:.0f} s)", flush=True)
        t0 = time.perf_counter()
        try:
            subprocess.run(cmd, timeout=limit, check=False)
            killed = False
        except subprocess.TimeoutExpired:
            killed = True
        record = json.loads(path.read_text()) if path.exists() else {"row": row}
        if killed:
            record["error"] = (record.get("error", "") + f" killed at the row limit ({limit:.0f} s)").strip()
        elif "step_s" not in record and "error" not in record:
            record["error"] = "the row process ended without a result"
        record["wall_s"] = round(time.perf_counter() - t0, 1)
        results.append(record)
    card = next((r["card"] for r in results if r.get("card")), "unknown")
    summary = {"card": card, "date": time.strftime("%Y-%m-%d"), "versions": versions(), "tiny": args.tiny,
               "results": results, "thinktune_over_trl": ratios(results), "driver_s": round(time.perf_counter() - start, 1)}
    (out_dir / ("bench_rl_tiny.json" if args.tiny else "bench_rl.json")).write_text(json.dumps(summary, indent=2, default=str))
    print(f"versions: {json.dumps(summary['versions'])}; driver {summary['driver_s']} s")
    print(table(results, card))
    return 0 if all("error" not in r for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows, run in this order")
    parser.add_argument("--row", choices=list(ROWS), help="run one row in this process (the driver's worker)")
    parser.add_argument("--tiny", action="store_true", help="tiny random Qwen2 on the CPU, G=2, 8 tokens")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up (fewer if the budget ends)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--row-s", type=float, default=90.0, help="wall-clock limit of one row's process")
    parser.add_argument("--deadline-s", type=float, default=240.0, help="the whole driver's limit")
    parser.add_argument("--min-row-s", type=float, default=25.0, help="skip a row with less time left than this")
    parser.add_argument("--budget-s", type=float, default=86.0, help="(worker) the row's own time budget")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = parser.parse_args(argv)
    args.group, args.completion_tokens, args.question_words = (2, 8, 12) if args.tiny else (8, 512, QUESTION_WORDS)
    if args.row:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        return run_row(args)
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
