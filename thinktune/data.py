"""Data: load question/CoT/answer rows, render them as R1 prompts, tokenise, batch.

The trip of one row: `sources.read_rows` (local files streamed, or a hub data set) ->
`formats.convert` (layout detected or `data.format`) -> `Sample(question, cot, response,
system, history)` -> `PromptFormat.render_prompt()` + `.completion()` ->
`Example(input_ids, labels)` with the loss on the completion (thinking + answer +
EOS) unless `train_on: all`. The prompt is tokenised on its own and the completion
appended, so the training prefix is token-for-token the inference prompt. Labels
come from positions, never from token ids, so the EOS stays a target even when the
tokenizer's pad id equals its EOS id (the R1 tokenizer's trap). `load_splits` is the one
train/eval split that training, evaluation and the report all use.

This module never loads a model and never touches a GPU.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from thinktune.config import DataConfig
from thinktune.errors import UserError, did_you_mean
from thinktune.formats import THINK_CLOSE, THINK_OPEN, Sample, Turn, convert, detect
from thinktune.sources import read_rows

IGNORE_INDEX = -100
SAMPLE_DIR = Path(__file__).parent / "sample_data"

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
SEED_INSTRUCTION = {"seed-zh": "你是一位具有高级临床推理，诊断和治疗规划知识的医学专家。\n请回答以下医学问题。\n",
                    "seed-en": "You are a medical expert with advanced knowledge in clinical reasoning, diagnostics, "
                               "and treatment planning.\nPlease answer the following medical question.\n"}


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
    format_notice: str = ""
    first_skip: str = ""

    def summary(self) -> str:
        """The format line (when known), then the counts line."""
        kept = len(self.lengths)
        parts = [f"{self.source}: {self.rows_read} rows read, {kept} used"]
        if self.skipped_bad:
            fields = not self.first_skip or "empty or non-text" in self.first_skip
            parts.append(f"{self.skipped_bad} skipped ({'empty or non-text fields' if fields else 'e.g. ' + self.first_skip})")
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_seq_length (their ends, EOS included, cut off)")
        if self.dropped_overlong:
            parts.append(f"{self.dropped_overlong} dropped (over max_seq_length)")
        counts = ", ".join(parts)
        return f"{self.format_notice}\n{counts}" if self.format_notice else counts

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
    """Renders a sample as (prompt, completion). prompt() is also the inference prompt.

    `instruction` replaces the seed templates' instruction text (or becomes the chat system
    message); a row's own system message takes precedence. Earlier assistant turns keep their
    thinking when `history_thinking` is "keep", else only their answer (as R1's template does).
    """

    def __init__(self, template: str, tokenizer: Any = None, instruction: str | None = None,
                 history_thinking: str = "drop"):
        if template not in ("seed-zh", "seed-en", "chat"):
            raise UserError(f"data.template '{template}' is unknown{did_you_mean(template, ['seed-zh', 'seed-en', 'chat'])}")
        self.template = template
        self.tokenizer = tokenizer
        self.instruction = instruction
        self.history_thinking = history_thinking
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise UserError("data.template is 'chat' but the tokenizer has no chat template: use template: seed-en or seed-zh")

    @classmethod
    def from_config(cls, cfg: DataConfig, tokenizer: Any = None) -> "PromptFormat":
        return cls(cfg.template, tokenizer, cfg.instruction, cfg.history_thinking)

    def prompt(self, question: str, system: str | None = None, history: Sequence[Turn] = ()) -> str:
        """Everything before the model's first thinking token; ends with '<think>\\n'."""
        return self.render_prompt(question, system, history)[0]

    def render_prompt(self, question: str, system: str | None = None, history: Sequence[Turn] = (),
                      want_spans: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """The prompt and (with want_spans) the character spans of its earlier assistant turns."""
        if self.template == "chat":
            return self._chat_prompt(question, system, history, want_spans)
        train = SEED_ZH_TRAIN if self.template == "seed-zh" else SEED_EN_TRAIN
        default = SEED_INSTRUCTION[self.template]
        head = train.split("\n### Question:")[0]
        instruction = system or self.instruction
        if instruction:
            head = head.replace(default, instruction.strip() + "\n")
        text, spans = head, []
        for turn in history:
            if turn.role == "user":
                text += f"\n### Question:\n{turn.content}\n\n### Response:\n"
            else:
                start = len(text)
                text += self._assistant_text(turn, "") + "\n"
                spans += [(start, len(text))] if want_spans else []
        return text + f"\n### Question:\n{question}\n\n### Response:\n<think>\n", spans

    def _assistant_text(self, turn: Turn, gap: str) -> str:
        """An earlier assistant turn as `completion()` writes one (gap: the template's extra newline), or its answer."""
        if self.history_thinking == "keep":
            return f"{THINK_OPEN}\n{turn.thinking}\n{THINK_CLOSE}\n{gap}{turn.content}"
        return turn.content

    def _chat_prompt(self, question: str, system: str | None, history: Sequence[Turn],
                     want_spans: bool) -> tuple[str, list[tuple[int, int]]]:
        messages: list[dict[str, str]] = []
        if system or self.instruction:
            messages.append({"role": "system", "content": (system or self.instruction or "").strip()})
        for turn in history:
            content = self._assistant_text(turn, "\n") if turn.role == "assistant" else turn.content
            messages.append({"role": turn.role, "content": content})
        messages.append({"role": "user", "content": question})
        render = lambda msgs, gen: self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
        text = render(messages, True)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or not want_spans:
                continue
            before, through = render(messages[:i], True), render(messages[: i + 1], False)
            start = next((k for k, (a, b) in enumerate(zip(before, through)) if a != b), min(len(before), len(through)))
            if not text.startswith(through):
                raise UserError("the chat template does not render earlier turns as a prefix of the conversation; "
                                "use data.loss_turns=last")
            spans.append((start, len(through)))
        stripped = text.rstrip("\n")
        if stripped.endswith(THINK_OPEN):  # R1's template already opens the thinking block
            return stripped + "\n", spans
        return text + THINK_OPEN + "\n", spans

    def completion(self, cot: str, response: str) -> str:
        """The thinking, the closing tag and the answer (the EOS token is added as an id)."""
        if self.template == "chat":
            return f"{cot}\n{THINK_CLOSE}\n\n{response}"
        return f"{cot}\n{THINK_CLOSE}\n{response}\n"

    def sample_prompt(self, sample: Sample) -> str:
        """The prompt of a sample: its system message, earlier turns and last question."""
        return self.prompt(sample.question, sample.system, sample.history)

    def full_text(self, sample: Sample) -> str:
        """The whole training text of a sample: prompt + completion."""
        return self.sample_prompt(sample) + self.completion(sample.cot, sample.response)


def split_thinking(generated: str) -> tuple[str, str, bool]:
    """Split generated text (after the prompt) into (thinking, answer, closed)."""
    if THINK_CLOSE in generated:
        thinking, answer = generated.split(THINK_CLOSE, 1)
        return thinking.strip(), answer.strip(), True
    return generated.strip(), "", False


# ----------------------------------------------------------------------------- loading

VERIFIABLE_SAMPLES = {
    "sample:verifiable-en": SAMPLE_DIR / "verifiable" / "medical_en_train.jsonl",
    "sample:verifiable-en-heldout": SAMPLE_DIR / "verifiable" / "medical_en_heldout.jsonl",
}
"""The packaged verifiable problems (question, reference answer) for RL (`thinktune.rl.problems`)."""
SAMPLE_NAMES = ["sample:en", "sample:en-heldout", "sample:zh", "sample:zh-heldout", *VERIFIABLE_SAMPLES]


def resolve_data_path(path: str) -> str:
    """'sample:en' -> the packaged English train file; 'sample:en-heldout' -> its held-out twin;
    'sample:verifiable-en[-heldout]' -> the packaged RL problems. The one place that knows the sample names."""
    if path in VERIFIABLE_SAMPLES:
        return str(VERIFIABLE_SAMPLES[path])
    if path.startswith("sample:"):
        name = path.split(":", 1)[1]
        lang, _, part = name.partition("-")
        file = SAMPLE_DIR / f"medical_{lang}_{part or 'train'}.jsonl"
        if not file.is_file():
            raise UserError(f"unknown sample data '{path}'{did_you_mean(path, SAMPLE_NAMES)}; choose one of "
                            f"{', '.join(SAMPLE_NAMES)}")
        return str(file)
    return path


def load_samples(path: str, cfg: DataConfig, split: str | None = None) -> tuple[list[Sample], DataReport]:
    """Read rows into Samples (format detected or `data.format`), skipping (or, with strict, refusing) bad rows."""
    source = resolve_data_path(path)
    rows = read_rows(source, cfg.subset, split or cfg.split)
    mapping = detect(rows.columns, cfg, path)
    report = DataReport(source=path, format_notice=f"format of {path}: {mapping.notice()}")
    samples: list[Sample] = []
    for row_no, (line_no, row) in enumerate(rows.rows, start=1):
        report.rows_read += 1
        sample = convert(row, mapping)
        if isinstance(sample, str):
            where = f"line {line_no}; " if rows.unit == "line" else ""
            if cfg.strict:
                raise UserError(f"{path}: row {row_no} has {sample} ({where}data.strict is on; fix the row or turn strict off to skip it)")
            report.skipped_bad += 1
            report.first_skip = report.first_skip or f"row {row_no} has {sample}"
            continue
        samples.append(sample)
        if cfg.max_rows and len(samples) >= cfg.max_rows:
            break
    if not samples:
        raise UserError(f"{path}: no usable rows ({report.rows_read} read, {report.skipped_bad} with empty or non-text fields)"
                        + (f"; {report.first_skip}" if report.first_skip else ""))
    return samples, report


# ----------------------------------------------------------------------------- tokenising

def eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise UserError("the tokenizer has no EOS token: the tuned model would never stop; set eos_token in its tokenizer_config.json")
    return int(eos)


def adds_special_tokens(tokenizer: Any, text: str) -> bool:
    """Whether to let the tokenizer add its special tokens to a prompt: not when the text already starts with
    the BOS (a chat template rendered it), or a BOS-adding tokenizer would put a second one in front."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (isinstance(bos, str) and bos and text.startswith(bos))


def encode_prompt(tokenizer: Any, text: str | list[str], **kwargs: Any) -> Any:
    """Tokenise a prompt (or a batch of one template's prompts) as training did: one BOS at most."""
    first = text if isinstance(text, str) else (text[0] if text else "")
    return tokenizer(text, add_special_tokens=adds_special_tokens(tokenizer, first), **kwargs)


def tokenize_sample(sample: Sample, fmt: PromptFormat, tokenizer: Any, train_on: str = "completion",
                    loss_turns: str = "last") -> Example:
    """Prompt ids (as at inference) + completion ids + EOS; labels mask the prompt unless train_on='all'.

    With loss_turns='all' the earlier assistant turns inside the prompt are targets too (found by
    character offsets, so the prompt's ids stay those of inference).
    """
    want_spans = train_on != "all" and loss_turns == "all" and any(t.role == "assistant" for t in sample.history)
    prompt, spans = fmt.render_prompt(sample.question, sample.system, sample.history, want_spans)
    if spans and not getattr(tokenizer, "is_fast", False):
        raise UserError("data.loss_turns=all needs a fast (Rust) tokenizer to locate the earlier turns; use data.loss_turns=last")
    encoded = encode_prompt(tokenizer, prompt, return_offsets_mapping=True) if spans else encode_prompt(tokenizer, prompt)
    prompt_ids = list(encoded["input_ids"])
    completion_ids = tokenizer(fmt.completion(sample.cot, sample.response), add_special_tokens=False)["input_ids"]
    completion_ids = list(completion_ids) + [eos_id(tokenizer)]
    input_ids = prompt_ids + completion_ids
    if train_on == "all":
        return Example(input_ids, list(input_ids))
    prompt_labels = [IGNORE_INDEX] * len(prompt_ids)
    for k, (start, end) in enumerate(encoded["offset_mapping"] if spans else []):
        if end > start and any(a <= start < b for a, b in spans):
            prompt_labels[k] = prompt_ids[k]
    return Example(input_ids, prompt_labels + completion_ids)


def build_examples(samples: Sequence[Sample], fmt: PromptFormat, tokenizer: Any, cfg: DataConfig,
                   report: DataReport) -> list[Example]:
    """Tokenise every sample, applying the overlong policy and filling the report.

    A row longer than max_seq_length loses its end (EOS, and often the answer and </think>) when cut,
    so with overlong=error (the default) any such row stops here with the fixes; truncate is the opt-in.
    """
    tokenized = [tokenize_sample(sample, fmt, tokenizer, cfg.train_on, cfg.loss_turns) for sample in samples]
    over = sum(1 for ex in tokenized if len(ex.input_ids) > cfg.max_seq_length)
    if over and cfg.overlong == "error":
        raise UserError(overlong_message(report.source, [len(ex.input_ids) for ex in tokenized], over, cfg.max_seq_length))
    examples: list[Example] = []
    for ex in tokenized:
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


def overlong_message(source: str, lengths: Sequence[int], over: int, limit: int) -> str:
    ordered = sorted(lengths)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return (f"{source}: {over} of {len(ordered)} rows are longer than data.max_seq_length={limit} tokens (p95 length "
            f"{p95}, longest {ordered[-1]}); cutting them would remove their EOS and often the answer and </think>: "
            f"raise data.max_seq_length (to {ordered[-1]} to keep every row) or set data.overlong: drop "
            f"(data.overlong: truncate trains on the cut rows anyway)")


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
    """Decode an example with the trained span wrapped in [[LOSS> ... <LOSS]].

    Byte-level tokens can end inside a multi-byte character; a span's edge moves on to the next
    whole character, and bytes of a character cut off by truncation are left out, so the preview
    never shows a split character.
    """
    ids = list(example.input_ids)
    flags = [lab != IGNORE_INDEX for lab in example.labels]
    edges = [k for k in range(1, len(ids)) if flags[k] != flags[k - 1]] + [len(ids)]
    parts: list[str] = []
    shown, start = "", 0
    for edge in edges:
        if edge <= start:
            continue
        text = tokenizer.decode(ids[:edge])
        while text.endswith("\ufffd") and edge < len(ids):
            edge += 1
            text = tokenizer.decode(ids[:edge])
        if edge == len(ids):
            text = text.rstrip("\ufffd")
        parts.append(_wrap(text[len(shown):], flags[start]))
        shown, start = text, edge
    return "".join(parts)


def _wrap(text: str, in_loss: bool) -> str:
    return f"[[LOSS>{text}<LOSS]]" if in_loss else text
