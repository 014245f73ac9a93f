"""Data: load question/CoT/answer rows, render them as R1 prompts, tokenise, batch.

The trip of one row: a `datasets` table (hub id or local JSON/JSONL/CSV/Parquet) ->
`Sample(question, cot, response)` -> `PromptFormat.prompt()` + `.completion()` ->
`Example(input_ids, labels)` with the loss on the completion (thinking + answer +
EOS) unless `train_on: all`. The prompt is tokenised on its own and the completion
appended, so the training prefix is token-for-token the inference prompt. Labels
come from positions, never from token ids, so the EOS stays a target even when the
tokenizer's pad id equals its EOS id (the R1 tokenizer's trap). `load_splits` is the one
train/eval split that training, evaluation and the report all use.

This module never loads a model and never touches a GPU.
"""
from __future__ import annotations

import codecs
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from thinktune.config import DataConfig
from thinktune.errors import UserError, did_you_mean
from thinktune.load_errors import hub_failure

IGNORE_INDEX = -100
SAMPLE_DIR = Path(__file__).parent / "sample_data"
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

# The seed's training template, byte for byte (shared/seed: `train_prompt_style`).
SEED_ZH_TRAIN = (
    "\n以下是一个任务说明，配有提供更多背景信息的输入。\n"
    "请写出一个恰当的回答来完成该任务。\n"
    "在回答之前，请仔细思考问题，并按步骤进行推理，确保回答逻辑清晰且准确。\n"
    "\n### Instruction:\n"
    "你是一位具有高级临床推理，诊断和治疗规划知识的医学专家。\n"
    "请回答以下医学问题。\n"
    "\n### Question:\n{}\n"
    "\n### Response:\n<think>\n{}\n</think>\n{}\n"
)
# The same template in English (our translation), for English-only models such as SmolLM2.
SEED_EN_TRAIN = (
    "\nBelow is an instruction that describes a task, paired with an input that provides further context.\n"
    "Write a response that appropriately completes the request.\n"
    "Before answering, think carefully about the question and reason step by step to ensure a logical and accurate response.\n"
    "\n### Instruction:\n"
    "You are a medical expert with advanced knowledge in clinical reasoning, diagnostics, and treatment planning.\n"
    "Please answer the following medical question.\n"
    "\n### Question:\n{}\n"
    "\n### Response:\n<think>\n{}\n</think>\n{}\n"
)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class Sample:
    question: str
    cot: str
    response: str


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_target_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class DataReport:
    """What happened to the rows on their way in: shown by `thinktune data` and `train`."""

    source: str
    rows_read: int = 0
    skipped_bad: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    lengths: list[int] = field(default_factory=list)
    target_tokens: int = 0

    def summary(self) -> str:
        kept = len(self.lengths)
        parts = [f"{self.source}: {self.rows_read} rows read, {kept} used"]
        if self.skipped_bad:
            parts.append(f"{self.skipped_bad} skipped (empty or non-text fields)")
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_seq_length")
        if self.dropped_overlong:
            parts.append(f"{self.dropped_overlong} dropped (over max_seq_length)")
        return ", ".join(parts)

    def length_stats(self) -> dict[str, float]:
        if not self.lengths:
            return {}
        ordered = sorted(self.lengths)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
        return {
            "rows": len(ordered), "min": ordered[0], "median": pick(0.5), "mean": round(sum(ordered) / len(ordered), 1),
            "p95": pick(0.95), "max": ordered[-1], "total_tokens": sum(ordered), "target_tokens": self.target_tokens,
        }


# ----------------------------------------------------------------------------- prompt formats

class PromptFormat:
    """Renders a sample as (prompt, completion). prompt() is also the inference prompt."""

    def __init__(self, template: str, tokenizer: Any = None):
        if template not in ("seed-zh", "seed-en", "chat"):
            raise UserError(f"data.template '{template}' is unknown{did_you_mean(template, ['seed-zh', 'seed-en', 'chat'])}")
        self.template = template
        self.tokenizer = tokenizer
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise UserError("data.template is 'chat' but the tokenizer has no chat template: use template: seed-en or seed-zh")

    def prompt(self, question: str) -> str:
        """Everything before the model's first thinking token; ends with '<think>\\n'."""
        if self.template == "chat":
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
            stripped = text.rstrip("\n")
            if stripped.endswith(THINK_OPEN):  # R1's template already opens the thinking block
                return stripped + "\n"
            return text + THINK_OPEN + "\n"
        train = SEED_ZH_TRAIN if self.template == "seed-zh" else SEED_EN_TRAIN
        head = train.split("<think>\n")[0]
        return head.format(question) + "<think>\n"

    def completion(self, cot: str, response: str) -> str:
        """The thinking, the closing tag and the answer (the EOS token is added as an id)."""
        if self.template == "chat":
            return f"{cot}\n{THINK_CLOSE}\n\n{response}"
        return f"{cot}\n{THINK_CLOSE}\n{response}\n"

    def full_text(self, sample: Sample) -> str:
        """The whole training text of a sample: prompt + completion."""
        return self.prompt(sample.question) + self.completion(sample.cot, sample.response)


def split_thinking(generated: str) -> tuple[str, str, bool]:
    """Split generated text (after the prompt) into (thinking, answer, closed)."""
    if THINK_CLOSE in generated:
        thinking, answer = generated.split(THINK_CLOSE, 1)
        return thinking.strip(), answer.strip(), True
    return generated.strip(), "", False


# ----------------------------------------------------------------------------- loading

def resolve_data_path(path: str) -> str:
    """'sample:en' -> the packaged English train file; 'sample:en-heldout' -> its held-out twin."""
    if path.startswith("sample:"):
        name = path.split(":", 1)[1]
        lang, _, part = name.partition("-")
        file = SAMPLE_DIR / f"medical_{lang}_{part or 'train'}.jsonl"
        if not file.is_file():
            choices = ["sample:en", "sample:en-heldout", "sample:zh", "sample:zh-heldout"]
            raise UserError(f"unknown sample data '{path}'{did_you_mean(path, choices)}; choose one of {', '.join(choices)}")
        return str(file)
    return path


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in LOCAL_FORMATS)
        if not files:
            raise UserError(f"{path}: folder holds no .json/.jsonl/.csv/.parquet files")
        kinds = {LOCAL_FORMATS[p.suffix.lower()] for p in files}
        if len(kinds) > 1:
            raise UserError(f"{path}: folder mixes file formats ({', '.join(sorted(kinds))}); keep one format per folder")
        return files
    if path.suffix.lower() not in LOCAL_FORMATS:
        raise UserError(f"{path}: unknown data format '{path.suffix}'; use .json, .jsonl, .csv or .parquet")
    return [path]


def _check_text_file(path: Path) -> None:
    """Fail early, with a line number, on invalid UTF-8 or broken JSON lines."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line_no = 1
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror})") from None
    with fh:
        for raw in fh:
            try:
                text = decoder.decode(raw)
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}: line {line_no} is not valid UTF-8 (byte {exc.start} of the line); re-save the file as UTF-8") from None
            if path.suffix.lower() == ".jsonl" and text.strip():
                try:
                    json.loads(text)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}: line {line_no} is not valid JSON ({exc.msg}); fix or remove that line") from None
            line_no += 1


def _load_table(path: str, subset: str | None, split: str) -> Any:
    import datasets

    datasets.disable_progress_bars()
    local = Path(path).expanduser()
    looks_local = local.exists() or local.suffix.lower() in LOCAL_FORMATS or path.startswith((".", "/", "~"))
    if looks_local:
        if not local.exists():
            raise UserError(f"data file {path} not found")
        files = _local_files(local)
        for file in files:
            if file.suffix.lower() in (".json", ".jsonl", ".csv"):
                _check_text_file(file)
        kind = LOCAL_FORMATS[files[0].suffix.lower()]
        try:
            return datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
        except Exception as exc:  # datasets wraps parser errors in several types
            raise UserError(f"{path}: could not be read as {kind} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    try:
        return datasets.load_dataset(path, subset, split=split)
    except ValueError as exc:
        raise UserError(f"data set {path} (subset {subset}, split {split}): {str(exc).splitlines()[0][:300]}") from None
    except Exception as exc:  # the hub client's and datasets' many error types: hub_failure tells them apart
        raise UserError(f"{hub_failure(exc, repr(path))} (data.path; a local .jsonl/.csv/.parquet file or folder "
                        f"needs no Hub)") from None


def load_samples(path: str, cfg: DataConfig, split: str | None = None) -> tuple[list[Sample], DataReport]:
    """Read rows into Samples, skipping (or, with strict, refusing) empty and non-text fields."""
    source = resolve_data_path(path)
    table = _load_table(source, cfg.subset, split or cfg.split)
    wanted = {"question": cfg.question_column, "cot": cfg.cot_column, "response": cfg.response_column}
    found = list(table.column_names)
    missing = [col for col in wanted.values() if col not in found]
    if missing:
        hints = []
        unused = [c for c in found if c not in wanted.values()]
        for role, col in wanted.items():
            if col in missing:
                close = did_you_mean(col, unused)
                guess = close.split(chr(39))[1] if close else (unused[0] if unused else "<column>")
                unused = [c for c in unused if c != guess]
                key = {"question": "question_column", "cot": "cot_column", "response": "response_column"}[role]
                hints.append(f"data.{key}={guess}")
        raise UserError(
            f"{path}: missing column(s) {', '.join(missing)}; columns found: {', '.join(found) or 'none'}; "
            f"map them with e.g. {' '.join(hints)}"
        )
    report = DataReport(source=path)
    samples: list[Sample] = []
    for row_no, row in enumerate(table, start=1):
        report.rows_read += 1
        values = {role: row[col] for role, col in wanted.items()}
        bad = [wanted[role] for role, v in values.items() if not isinstance(v, str) or not v.strip()]
        if bad:
            if cfg.strict:
                raise UserError(f"{path}: row {row_no} has an empty or non-text {', '.join(bad)} (data.strict is on; fix the row or turn strict off to skip it)")
            report.skipped_bad += 1
            continue
        samples.append(Sample(values["question"].strip(), values["cot"].strip(), values["response"].strip()))
        if cfg.max_rows and len(samples) >= cfg.max_rows:
            break
    if not samples:
        raise UserError(f"{path}: no usable rows ({report.rows_read} read, {report.skipped_bad} with empty or non-text fields)")
    return samples, report


# ----------------------------------------------------------------------------- tokenising

def eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise UserError("the tokenizer has no EOS token: the tuned model would never stop; set eos_token in its tokenizer_config.json")
    return int(eos)


def tokenize_sample(sample: Sample, fmt: PromptFormat, tokenizer: Any, train_on: str = "completion") -> Example:
    """Prompt ids (as at inference) + completion ids + EOS; labels mask the prompt unless train_on='all'."""
    prompt_ids = tokenizer(fmt.prompt(sample.question), add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(fmt.completion(sample.cot, sample.response), add_special_tokens=False)["input_ids"]
    completion_ids = list(completion_ids) + [eos_id(tokenizer)]
    input_ids = list(prompt_ids) + completion_ids
    if train_on == "all":
        labels = list(input_ids)
    else:
        labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return Example(input_ids, labels)


def build_examples(samples: Sequence[Sample], fmt: PromptFormat, tokenizer: Any, cfg: DataConfig,
                   report: DataReport) -> list[Example]:
    """Tokenise every sample, applying the overlong policy and filling the report."""
    examples: list[Example] = []
    for sample in samples:
        ex = tokenize_sample(sample, fmt, tokenizer, cfg.train_on)
        if len(ex.input_ids) > cfg.max_seq_length:
            if cfg.overlong == "drop":
                report.dropped_overlong += 1
                continue
            report.truncated += 1
            ex = Example(ex.input_ids[: cfg.max_seq_length], ex.labels[: cfg.max_seq_length])
        if ex.num_target_tokens == 0:
            report.dropped_overlong += 1  # prompt alone fills the window: nothing to learn
            continue
        examples.append(ex)
        report.lengths.append(len(ex.input_ids))
        report.target_tokens += ex.num_target_tokens
    if not examples:
        why = "set data.overlong=truncate or raise" if cfg.overlong == "drop" else "even the prompt alone fills it; raise"
        raise UserError(
            f"{report.source}: every row is longer than data.max_seq_length={cfg.max_seq_length} ({why} data.max_seq_length)"
        )
    return examples


def carve_eval(samples: list[Sample], size: int | float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split off a fixed-seed eval set: `size` rows, or a fraction of them when size < 1."""
    count = int(round(len(samples) * size)) if isinstance(size, float) and size < 1 else int(size)
    if count <= 0:
        return samples, []
    if count >= len(samples):
        raise UserError(f"data.eval_size={size} leaves no training rows (only {len(samples)} rows)")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


@dataclass
class Splits:
    """The run's training and held-out rows, split the one way training, evaluation and the report use."""

    train: list[Sample]
    train_report: DataReport | None
    """None when only the held-out rows were asked for (`load_splits(..., with_train=False)`)."""
    eval: list[Sample]
    eval_report: DataReport
    eval_kind: str
    """"file" (data.eval_path / data.eval_split), "carved" (data.eval_size rows of train) or "none"."""
    eval_label: str
    """Where the held-out rows come from, in words."""


def load_splits(cfg: DataConfig, seed: int, with_train: bool = True) -> Splits:
    """Train and held-out rows: data.eval_path / eval_split when set, else data.eval_size rows carved
    from train with the run's seed (`carve_eval`), else no held-out rows."""
    if cfg.eval_path or cfg.eval_split:
        train, train_report = load_samples(cfg.path, cfg) if with_train else ([], None)
        source = cfg.eval_path or cfg.path
        eval_samples, eval_report = load_samples(source, cfg, cfg.eval_split)
        eval_report.source = f"eval {eval_report.source}"
        label = source + (f" (split {cfg.eval_split})" if cfg.eval_split else "")
        return Splits(train, train_report, eval_samples, eval_report, "file", label)
    samples, train_report = load_samples(cfg.path, cfg)
    train, eval_samples = carve_eval(samples, cfg.eval_size, seed)
    kind = "carved" if eval_samples else "none"
    carved_report = DataReport(source="eval (carved from train)", rows_read=len(eval_samples))
    return Splits(train, train_report, eval_samples, carved_report, kind, f"{cfg.path} (eval rows carved by training)")


# ----------------------------------------------------------------------------- batching

def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The micro-batches of one epoch: a permutation fixed by (seed, epoch), cut into batch_size pieces."""
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(num_examples, generator=gen).tolist()
    return [order[i: i + batch_size] for i in range(0, num_examples, batch_size)]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. Padding is masked by position (attention_mask, labels=-100)."""
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_packed(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Padding-free: all rows in one sequence; position_ids restart per row, seq_lens mark the documents."""
    input_ids = torch.tensor([t for ex in examples for t in ex.input_ids], dtype=torch.long)[None]
    labels = torch.tensor([t for ex in examples for t in _shift_guard(ex.labels)], dtype=torch.long)[None]
    position_ids = torch.cat([torch.arange(len(ex.input_ids)) for ex in examples])[None]
    seq_lens = torch.tensor([len(ex.input_ids) for ex in examples], dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "seq_lens": seq_lens}


def pack_by_tokens(examples: Sequence[Example], token_budget: int) -> list[list[Example]]:
    """Group a step's examples into packed micro-batches of at most `token_budget` tokens each.

    First-fit decreasing: longest first, each into the first group with room (an example longer
    than the budget gets a group of its own). Deterministic; the step's examples are all used
    once, so the step's loss (summed over its target tokens) is the same as unpacked.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    groups: list[list[Example]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        slot = next((g for g, free in enumerate(room) if free >= n), None)
        if slot is None:
            groups.append([examples[i]])
            room.append(token_budget - n)
        else:
            groups[slot].append(examples[i])
            room[slot] -= n
    return groups


def _shift_guard(labels: list[int]) -> list[int]:
    """In a packed row the first token of a document must never be a target of the previous one."""
    return [IGNORE_INDEX] + labels[1:] if labels else labels


# ----------------------------------------------------------------------------- preview

def length_histogram(lengths: Sequence[int], bins: int = 10, width: int = 40) -> str:
    """A text histogram of token lengths."""
    if not lengths:
        return "(no rows)"
    low, high = min(lengths), max(lengths)
    step = max(1, math.ceil((high - low + 1) / bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, (n - low) // step)] += 1
    top = max(counts)
    lines = []
    for i, c in enumerate(counts):
        a, b = low + i * step, low + (i + 1) * step - 1
        if a > high:
            break
        lines.append(f"{a:>6}-{b:<6} {'#' * max(1 if c else 0, round(width * c / top)):<{width}} {c}")
    return "\n".join(lines)


def render_loss_span(example: Example, tokenizer: Any) -> str:
    """Decode an example with the trained span wrapped in [[LOSS> ... <LOSS]]."""
    parts: list[str] = []
    current: list[int] = []
    in_loss = None
    for tok, lab in zip(example.input_ids, example.labels):
        flag = lab != IGNORE_INDEX
        if in_loss is not None and flag != in_loss:
            parts.append(_wrap(tokenizer.decode(current), in_loss))
            current = []
        current.append(tok)
        in_loss = flag
    if current:
        parts.append(_wrap(tokenizer.decode(current), bool(in_loss)))
    return "".join(parts)


def _wrap(text: str, in_loss: bool) -> str:
    return f"[[LOSS>{text}<LOSS]]" if in_loss else text
