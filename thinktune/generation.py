"""Generate: answer questions with base or base + adapter, thinking and answer apart.

The prompt is built by the same `PromptFormat` that trained the adapter (read from
the adapter's saved run config), so the inference prompt is the training prefix ending
in '<think>\\n'. Output is split at '</think>' into thinking and answer.
This module never trains and never writes into an adapter folder.
"""
from __future__ import annotations

import json
import shutil
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from thinktune.checkpoint import read_run_config
from thinktune.data import PromptFormat, Sample, encode_prompt, eos_id, split_thinking
from thinktune.errors import UserError
from thinktune.export import load_with_adapter
from thinktune.prompt_record import resolve_template


@dataclass
class Answer:
    question: str
    thinking: str
    answer: str
    closed_think: bool
    stopped_at_eos: bool
    new_tokens: int
    text: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def saved_data_config(adapter_dir: str | Path | None) -> dict[str, Any]:
    """The `data` section of the run config saved beside a thinktune adapter ({} for a foreign adapter)."""
    saved = read_run_config(Path(adapter_dir)) if adapter_dir else None
    return saved.get("data", {}) if saved is not None else {}


def template_of(adapter_dir: str | Path | None, template: str | None) -> str:
    return template or saved_data_config(adapter_dir).get("template", "seed-zh")


def prompt_format(adapter_dir: str | Path | None, template: str | None, tokenizer: Any) -> PromptFormat:
    """The adapter's training prompt format: its template (unless overridden), instruction and history switch."""
    data = saved_data_config(adapter_dir)
    return PromptFormat(template or data.get("template", "seed-zh"), tokenizer, data.get("instruction"),
                        data.get("history_thinking", "drop"))


def _prompt(fmt: PromptFormat, question: str | Sample) -> str:
    return fmt.prompt(question) if isinstance(question, str) else fmt.sample_prompt(question)


class _Printer:
    """A transformers streamer that hands decoded text pieces to a callback."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]):
        from transformers import TextStreamer

        class Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                on_text(text)

        self.streamer = Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _generation_kwargs(tokenizer: Any, max_new_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "eos_token_id": eos_id(tokenizer),
                              "pad_token_id": tokenizer.pad_token_id, "use_cache": True}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def _to_answer(question: str, new_ids: list[int], tokenizer: Any) -> Answer:
    """Cut the generated ids after the first EOS (padding repeats it) and split thinking from answer."""
    stop = eos_id(tokenizer)
    stopped = stop in new_ids
    if stopped:
        new_ids = new_ids[: new_ids.index(stop) + 1]
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    thinking, reply, closed = split_thinking(text)
    return Answer(question, thinking, reply, closed, stopped, len(new_ids), text)


@torch.no_grad()
def answer(model: Any, tokenizer: Any, fmt: PromptFormat, question: str, max_new_tokens: int = 512,
           temperature: float = 0.0, top_p: float = 0.95, on_text: Callable[[str], None] | None = None) -> Answer:
    """Generate one answer (greedy when temperature is 0), streaming text pieces to on_text."""
    inputs = encode_prompt(tokenizer, fmt.prompt(question), return_tensors="pt").to(model.device)
    kwargs = _generation_kwargs(tokenizer, max_new_tokens, temperature, top_p)
    if on_text is not None:
        kwargs["streamer"] = _Printer(tokenizer, on_text).streamer
    output = model.generate(**inputs, **kwargs)
    return _to_answer(question, output[0, inputs["input_ids"].shape[1]:].tolist(), tokenizer)


@torch.no_grad()
def answer_batch(model: Any, tokenizer: Any, fmt: PromptFormat, questions: list[str] | list[Sample], max_new_tokens: int = 512,
                 temperature: float = 0.0, top_p: float = 0.95, batch_size: int = 8) -> list[Answer]:
    """Answer several questions, `batch_size` at a time (left-padded prompts; same tokens as one by one, up to
    floating-point ties). A Sample is prompted with its system message and earlier turns."""
    answers: list[Answer] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(questions), batch_size):
            chunk = questions[i: i + batch_size]
            prompts = [_prompt(fmt, q) for q in chunk]
            inputs = encode_prompt(tokenizer, prompts, return_tensors="pt", padding=True).to(model.device)
            output = model.generate(**inputs, **_generation_kwargs(tokenizer, max_new_tokens, temperature, top_p))
            width = inputs["input_ids"].shape[1]
            answers += [_to_answer(q if isinstance(q, str) else q.question, output[row, width:].tolist(), tokenizer)
                        for row, q in enumerate(chunk)]
    finally:
        tokenizer.padding_side = side
    return answers


def read_questions(path: str | Path) -> list[str]:
    """Questions from a .jsonl (keys question/Question) or a plain text file (one per line)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"questions file {file} not found")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{file}: not valid UTF-8") from None
    questions = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if file.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{file}: line {number} is not valid JSON ({exc.msg})") from None
            text = row.get("question", row.get("Question")) if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"{file}: line {number} has no 'question' (or 'Question') text")
            questions.append(text.strip())
        else:
            questions.append(line.strip())
    if not questions:
        raise UserError(f"{file}: no questions")
    return questions


def format_answer(ans: Answer, label: str = "") -> str:
    head = f"== {label} ==\n" if label else ""
    status = "closed </think>" if ans.closed_think else "no </think>"
    status += ", stopped at EOS" if ans.stopped_at_eos else f", hit the {ans.new_tokens}-token limit"
    return f"{head}[thinking]\n{ans.thinking}\n[answer]\n{ans.answer or '(none)'}\n({status}, {ans.new_tokens} tokens)"


def side_by_side(left: str, right: str, titles: tuple[str, str] = ("BASE", "TUNED")) -> str:
    """Two texts in two columns (the terminal's width), for the before/after comparison."""
    width = max(40, shutil.get_terminal_size((120, 20)).columns)
    col = (width - 3) // 2
    wrap = lambda text: [w for line in text.splitlines() for w in (textwrap.wrap(line, col) or [""])]  # noqa: E731
    a, b = wrap(left), wrap(right)
    rows = [f"{titles[0]:<{col}} | {titles[1]}", f"{'-' * col}-+-{'-' * col}"]
    for i in range(max(len(a), len(b))):
        rows.append(f"{(a[i] if i < len(a) else ''):<{col}} | {b[i] if i < len(b) else ''}")
    return "\n".join(rows)


def generate(questions: Iterable[str], adapter: str | None = None, base: str | None = None, template: str | None = None,
             max_new_tokens: int = 512, temperature: float = 0.0, compare: bool = False, stream: bool = True,
             out: Callable[[str], None] = print, trust_remote_code: bool = False) -> list[dict[str, Any]]:
    """Answer each question; with compare=True also with the adapter switched off. Returns dicts.

    trust_remote_code: the user's permission for the model's own code (never read from the adapter folder).
    """
    model, tokenizer, _ = load_with_adapter(adapter, base, trust_remote_code=trust_remote_code)
    name, where = resolve_template(adapter, base, template)
    out(f"prompt template: {name} (from {where})")
    data = saved_data_config(adapter)
    fmt = PromptFormat(name, tokenizer, data.get("instruction"), data.get("history_thinking", "drop"))
    results = []
    for question in questions:
        out(f"\n### {question}")
        if compare:
            if adapter is None:
                raise UserError("--compare needs --adapter (it compares base and tuned)")
            with model.disable_adapter():
                before = answer(model, tokenizer, fmt, question, max_new_tokens, temperature)
            after = answer(model, tokenizer, fmt, question, max_new_tokens, temperature)
            out(side_by_side(format_answer(before), format_answer(after)))
            results.append({"question": question, "base": before.as_dict(), "tuned": after.as_dict()})
            continue
        printer = (lambda text: print(text, end="", flush=True)) if stream else None
        ans = answer(model, tokenizer, fmt, question, max_new_tokens, temperature, on_text=printer)
        if stream:
            print()
        out(format_answer(ans))
        results.append(ans.as_dict())
    return results


def generate_command(args: Any) -> int:
    """`thinktune generate [QUESTION ...] --adapter DIR | --base MODEL [--compare] [--file F] [--out F.jsonl]`."""
    import json
    from pathlib import Path

    questions = list(args.questions)
    if args.file:
        questions += read_questions(args.file)
    if not questions:
        raise UserError('give a question ("...") or --file questions.jsonl')
    results = generate(questions, adapter=args.adapter, base=args.base, template=args.template,
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature, compare=args.compare,
                       stream=not args.no_stream, trust_remote_code=args.trust_remote_code)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results), encoding="utf-8")
        print(f"wrote {len(results)} answers to {args.out}")
    return 0
