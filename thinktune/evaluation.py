"""Evaluate: did the tuning work? Base vs tuned on held-out questions, side by side.

Two measurements per model. The base is the same loaded weights with the adapter
switched off (`model.disable_adapter()`), so the model is loaded once:

1. loss and perplexity on the reference completions, tokenised exactly as in
   training (`data.build_examples` -> `tokenize_sample` with the adapter's template,
   train_on and max_seq_length), batched through `objective.heldout_loss`;
2. format compliance of greedy generations (`generation.answer`): the share that close
   `</think>`, that give a non-empty answer after it, that stop with EOS inside the
   token budget, and mean thinking / answer lengths in tokens (the generated text is
   split at `</think>` and each part re-tokenised with the model's tokenizer).

`run_eval(...) -> dict` is the API; `thinktune eval` prints the table and writes JSON.
This module never trains and writes nothing but the JSON file it is asked for.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from thinktune.checkpoint import read_run_config
from thinktune.config import RunConfig, config_from_dict, load_config
from thinktune.data import (DataReport, PromptFormat, Sample, build_examples, eos_id, load_samples, load_splits,
                            split_thinking)
from thinktune.errors import UserError

EVAL_FILE = "eval.json"
LENGTH_UNIT = "tokens"  # thinking/answer lengths: the split text re-tokenised by the model's tokenizer


# ----------------------------------------------------------------------------- scoring one generation

@dataclass
class FormatScore:
    """How one generation follows the trained format."""

    closed_think: bool
    answered: bool  # closed </think> and a non-empty answer after it
    stopped_at_eos: bool  # the last generated token is EOS (so it stopped inside the budget)
    thinking_tokens: int
    answer_tokens: int

    @property
    def ok(self) -> bool:
        return self.closed_think and self.answered and self.stopped_at_eos


def score_text(text: str, stopped_at_eos: bool, count_tokens: Callable[[str], int]) -> FormatScore:
    """Score generated text (everything after the prompt, special tokens removed)."""
    thinking, reply, closed = split_thinking(text)
    return FormatScore(
        closed_think=closed,
        answered=closed and bool(reply),
        stopped_at_eos=stopped_at_eos,
        thinking_tokens=count_tokens(thinking) if thinking else 0,
        answer_tokens=count_tokens(reply) if reply else 0,
    )


def token_counter(tokenizer: Any) -> Callable[[str], int]:
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def score_tokens(new_ids: Sequence[int], tokenizer: Any) -> FormatScore:
    """Score generated token ids: stopped at EOS when the last id is the tokenizer's EOS."""
    ids = list(new_ids)
    stopped = bool(ids) and ids[-1] == eos_id(tokenizer)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return score_text(text, stopped, token_counter(tokenizer))


def summarize_scores(scores: Sequence[FormatScore]) -> dict[str, float]:
    """Shares (0..1) and mean lengths over a model's generations."""
    n = max(1, len(scores))
    share = lambda flag: sum(1 for s in scores if flag(s)) / n  # noqa: E731
    return {
        "closed_think": share(lambda s: s.closed_think),
        "answered": share(lambda s: s.answered),
        "stopped_at_eos": share(lambda s: s.stopped_at_eos),
        "format_ok": share(lambda s: s.ok),
        "mean_thinking_tokens": sum(s.thinking_tokens for s in scores) / n,
        "mean_answer_tokens": sum(s.answer_tokens for s in scores) / n,
    }


# ----------------------------------------------------------------------------- what to evaluate

def resolve_run(config: RunConfig | str | Path | None, adapter: str | Path | None, base: str | None,
                overrides: list[str] | None = None) -> tuple[RunConfig, Path | None]:
    """The run's config (from CONFIG or the adapter's saved run config) and the adapter folder (None: base only)."""
    if config is not None:
        cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
        folder = Path(adapter) if adapter else Path(cfg.output.output_dir)
        if not (folder / "adapter_config.json").is_file():
            raise UserError(f"{folder} holds no adapter yet (no adapter_config.json): train first, or pass --adapter DIR")
        return cfg, folder
    if adapter is not None:
        from thinktune.export import check_adapter_dir

        folder = check_adapter_dir(adapter)  # a missing or non-adapter folder: before any data or model loads
        saved = read_run_config(folder)
        if saved is not None:
            cfg = config_from_dict(saved)
            cfg.model.trust_remote_code = False  # a saved file never allows code to run; the user's flag does
            return cfg, folder
        return RunConfig(), folder  # a foreign PEFT adapter: give --data (and --template)
    if not base:
        raise UserError("give a CONFIG, --adapter DIR, or --base MODEL")
    return RunConfig(), None


def heldout_samples(cfg: RunConfig, data: str | None = None) -> tuple[list[Sample], str]:
    """Held-out rows: --data, else the config's eval data, else the rows training carved off (same seed)."""
    if data:
        return load_samples(data, cfg.data)[0], data
    if cfg.data.eval_path or cfg.data.eval_split or cfg.data.eval_size:
        splits = load_splits(cfg.data, cfg.train.seed, with_train=False)
        return splits.eval, splits.eval_label
    raise UserError("no held-out data: the config has no data.eval_path / eval_split and data.eval_size is 0; pass --data PATH")


def auto_budget(samples: Sequence[Sample], fmt: PromptFormat, tokenizer: Any) -> int:
    """max_new_tokens when not given: 1.5x the longest reference completion (+EOS), rounded up to 32."""
    longest = max(len(tokenizer(fmt.completion(s.cot, s.response), add_special_tokens=False)["input_ids"]) for s in samples)
    return int(math.ceil(1.5 * (longest + 1) / 32) * 32)


# ----------------------------------------------------------------------------- measuring one model

def completion_loss(model: Any, examples: list[Any], tokenizer: Any, batch_size: int, amp_dtype: Any) -> dict[str, float]:
    from thinktune.objective import heldout_loss

    loss, tokens = heldout_loss(model, examples, batch_size, tokenizer.pad_token_id, model.device, amp_dtype)
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "loss_tokens": tokens}


def greedy_answers(model: Any, tokenizer: Any, fmt: PromptFormat, questions: Sequence[Sample], max_new_tokens: int,
                   label: str, log: Callable[[str], None], batch_size: int = 16,
                   progress: bool = True) -> tuple[list[dict[str, Any]], list[FormatScore]]:
    from thinktune.generation import answer_batch

    count = token_counter(tokenizer)
    results, scores = [], []
    bar = f"{label}: generating {len(questions)} answers" if progress else None
    answers = answer_batch(model, tokenizer, fmt, list(questions), max_new_tokens, batch_size=batch_size, progress=bar)
    for i, ans in enumerate(answers, start=1):
        score = score_text(ans.text, ans.stopped_at_eos, count)
        results.append({**ans.as_dict(), "score": {**asdict(score), "ok": score.ok}})
        scores.append(score)
        log(f"  {label} {i}/{len(questions)}: {'format ok' if score.ok else 'format NOT ok'} ({ans.new_tokens} tokens)")
    return results, scores


def measure(model: Any, tokenizer: Any, fmt: PromptFormat, examples: list[Any], questions: Sequence[Sample],
            max_new_tokens: int, batch_size: int, amp_dtype: Any, label: str,
            log: Callable[[str], None], progress: bool = True) -> tuple[dict[str, float], list[dict[str, Any]]]:
    t0 = time.perf_counter()
    row: dict[str, float] = completion_loss(model, examples, tokenizer, batch_size, amp_dtype)
    answers: list[dict[str, Any]] = []
    if questions:
        answers, scores = greedy_answers(model, tokenizer, fmt, questions, max_new_tokens, label, log,
                                         progress=progress)
        row.update(summarize_scores(scores))
        row["mean_new_tokens"] = sum(a["new_tokens"] for a in answers) / len(answers)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row, answers


# ----------------------------------------------------------------------------- the whole evaluation

def run_eval(config: RunConfig | str | Path | None = None, adapter: str | Path | None = None, base: str | None = None,
             data: str | None = None, n: int | None = None, max_new_tokens: int | None = None,
             template: str | None = None, batch_size: int | None = None, with_base: bool = True,
             generations: bool = True, out: str | Path | None = None, overrides: list[str] | None = None,
             log: Callable[[str], None] = print, trust_remote_code: bool = False, questions: int | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Evaluate base and base + adapter on held-out questions; return (and optionally write) the results.

    config / adapter / base: what to evaluate (see `thinktune eval --help`); data: held-out rows
    (default: the config's eval data); n: first N rows; max_new_tokens: generation budget
    (default `auto_budget`); with_base=False skips the base column; generations=False measures
    the loss only; questions: generate answers for the first N rows only (the loss uses all rows);
    progress: a progress bar on stderr while generating; trust_remote_code lets the model's own code
    run (CONFIG's model.trust_remote_code also does; an adapter folder's saved config never does).
    The dict has "models" -> {"base", "tuned"} rows, "answers" and the settings.
    """
    import torch

    from thinktune.export import load_with_adapter
    from thinktune.model import precision_dtype

    cfg, folder = resolve_run(config, adapter, base, overrides)
    samples, source = heldout_samples(cfg, data)
    samples = samples[:n] if n else samples
    trust = trust_remote_code or cfg.model.trust_remote_code  # the flag, or the user's own YAML (never a saved file)
    model, tokenizer, model_cfg = load_with_adapter(folder, base or (cfg.model.name_or_path if folder is None else None),
                                                    trust_remote_code=trust)
    fmt = PromptFormat(template or cfg.data.template, tokenizer, cfg.data.instruction, cfg.data.history_thinking)
    report = DataReport(source=source, rows_read=len(samples))
    examples = build_examples(samples, fmt, tokenizer, cfg.data, report)
    budget = max_new_tokens or auto_budget(samples, fmt, tokenizer)
    amp = precision_dtype(cfg.train.precision, model.device) if model.device.type == "cuda" else None
    bsz = batch_size or cfg.train.batch_size
    asked = list(samples)[:questions] if generations else []
    log(f"eval: {len(samples)} held-out rows from {source} (loss), {len(asked)} answered (greedy, max_new_tokens "
        f"{budget}); {'base vs tuned' if folder and with_base else 'tuned' if folder else 'base'}")
    torch.manual_seed(0)
    models: dict[str, dict[str, float]] = {}
    answers: dict[str, list[dict[str, Any]]] = {}
    if folder is None:
        models["base"], answers["base"] = measure(model, tokenizer, fmt, examples, asked, budget, bsz, amp, "base", log,
                                                  progress)
    else:
        if with_base:
            with model.disable_adapter():
                models["base"], answers["base"] = measure(model, tokenizer, fmt, examples, asked, budget, bsz, amp,
                                                          "base", log, progress)
        models["tuned"], answers["tuned"] = measure(model, tokenizer, fmt, examples, asked, budget, bsz, amp,
                                                    "tuned", log, progress)
    count = token_counter(tokenizer)
    reference = {
        "mean_thinking_tokens": sum(count(s.cot) for s in samples) / len(samples),
        "mean_answer_tokens": sum(count(s.response) for s in samples) / len(samples),
    }
    result = {
        "adapter": str(folder) if folder else None, "base_model": model_cfg.name_or_path, "data": source,
        "template": fmt.template, "rows": len(samples), "loss_rows": len(examples), "answered_rows": len(asked),
        "truncated": report.truncated, "dropped": report.dropped_overlong, "max_new_tokens": budget,
        "decoding": "greedy", "length_unit": LENGTH_UNIT, "models": models, "reference": reference,
        "answers": [
            {"question": s.question, "reference": {"thinking": s.cot, "answer": s.response},
             **{name: rows[i] for name, rows in answers.items() if i < len(rows)}}
            for i, s in enumerate(samples)
        ],
    }
    if out:
        Path(out).write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    return result


def read_eval(path: str | Path) -> dict[str, Any] | None:
    file = Path(path)
    if file.is_dir():
        file = file / EVAL_FILE
    if not file.is_file():
        return None
    return json.loads(file.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- presenting

ROWS = [  # (key, label, kind)
    ("loss", "loss on reference completions", "num"),
    ("ppl", "perplexity", "num"),
    ("closed_think", "closes </think>", "pct"),
    ("answered", "non-empty answer after </think>", "pct"),
    ("stopped_at_eos", "stops at EOS within budget", "pct"),
    ("format_ok", "all three (format ok)", "pct"),
    ("mean_thinking_tokens", "mean thinking length (tokens)", "len"),
    ("mean_answer_tokens", "mean answer length (tokens)", "len"),
]


def format_value(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.0f}%"
    if kind == "len":
        return f"{value:.0f}"
    return f"{value:.3f}" if value < 100 else f"{value:.1f}"


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the base/tuned table (shared by the terminal, the Markdown and the HTML report)."""
    models = result["models"]
    names = [m for m in ("base", "tuned") if m in models]
    header = ["metric"] + names + (["change"] if len(names) == 2 else []) + ["reference"]
    rows = []
    for key, label, kind in ROWS:
        values = [models[m].get(key) for m in names]
        if all(v is None for v in values):
            continue
        row = [label] + [format_value(v, kind) for v in values]
        if len(names) == 2:
            row.append(change(values[0], values[1], kind))
        row.append(format_value(result.get("reference", {}).get(key), kind) if kind == "len" else "")
        rows.append(row)
    return header, rows


def change(before: float | None, after: float | None, kind: str) -> str:
    if before is None or after is None:
        return ""
    if kind == "pct":
        return f"{100 * (after - before):+.0f} pts"
    if before == 0:
        return ""
    return f"{100 * (after - before) / abs(before):+.1f}%"


def format_table(result: dict[str, Any]) -> str:
    header, rows = table_rows(result)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    answered = result.get("answered_rows", result["rows"])
    asked = f" ({answered} answered)" if answered != result["rows"] else ""
    title = (f"{result['rows']} held-out rows{asked} from {result['data']}; greedy, max_new_tokens {result['max_new_tokens']}; "
             f"lengths in {result['length_unit']}")
    return "\n".join([title, line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def learning_figures(result: dict[str, Any]) -> list[str]:
    """The two headline lines: eval loss base -> tuned, and format compliance base -> tuned."""
    models = result.get("models", {})
    base, tuned = models.get("base"), models.get("tuned")
    if not base or not tuned:
        return []
    drop = 100 * (base["loss"] - tuned["loss"]) / base["loss"] if base["loss"] else 0.0
    lines = [f"eval loss: base {base['loss']:.3f} -> tuned {tuned['loss']:.3f} ({-drop:+.1f}%)"]
    if "format_ok" in tuned:
        lines.append(f"format ok (closes </think>, answers, stops at EOS): base {100 * base['format_ok']:.0f}% -> "
                     f"tuned {100 * tuned['format_ok']:.0f}%")
    return lines


def default_out(config: str | None, overrides: list[str] | None, adapter: str | None) -> str:
    """OUTPUT_DIR/eval.json when evaluating a run's folder (the report reads it there), else ./eval.json."""
    run_dir = Path(adapter) if adapter else None
    if run_dir is None and config:
        run_dir = Path(load_config(config, overrides).output.output_dir)
    if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
        return str(run_dir / EVAL_FILE)
    return EVAL_FILE


def eval_command(args: Any) -> int:
    """`thinktune eval [CONFIG] [--adapter DIR] [--base MODEL] [--data PATH] [--n N] ...`."""
    out = args.out or default_out(args.config, args.overrides, args.adapter)
    result = run_eval(args.config, args.adapter, args.base, args.data, args.n, args.max_new_tokens, args.template,
                      args.batch_size, not args.no_base, not args.loss_only, out, args.overrides,
                      trust_remote_code=args.trust_remote_code)
    print("\n" + format_table(result))
    for line in learning_figures(result):
        print(line)
    print(f"wrote {out}")
    return 0
