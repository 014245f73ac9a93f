"""Generate: answer questions with base or base + adapter, thinking and answer apart.

The prompt is built by the same `PromptFormat` that trained the adapter (read from
the adapter's saved run config), so the inference prompt is the training prefix ending
in '<think>\\n'. Output is split at '</think>' into thinking and answer.
This module never trains and never writes into an adapter folder.
"""
from __future__ import annotations

import json
import shutil
import sys
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from thinktune.checkpoint import read_run_config
from thinktune.data import PromptFormat, Sample, encode_prompt, eos_id, split_thinking
from thinktune.errors import UserError
from thinktune.export import check_adapter_dir, load_with_adapter
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


def prompt_format(adapter_dir: str | Path | None, template: str | None, tokenizer: Any,
                  base: str | None = None) -> PromptFormat:
    """The adapter's training prompt format: its template (unless overridden; a merged base's record otherwise),
    instruction and history switch."""
    return prompt_format_and_source(adapter_dir, template, tokenizer, base)[0]


def prompt_format_and_source(adapter_dir: str | Path | None, template: str | None, tokenizer: Any,
                             base: str | None = None) -> tuple[PromptFormat, str]:
    """`prompt_format` and where its template came from (for the "prompt template: ..." line)."""
    name, where = resolve_template(adapter_dir, base, template)
    data = saved_data_config(adapter_dir)
    return PromptFormat(name, tokenizer, data.get("instruction"), data.get("history_thinking", "drop")), where


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


class TokenProgress:
    """A progress bar (tqdm, on stderr) over the decoding steps of batched generation: `generate()` calls
    `put` with the prompt once, then once per new token for the whole batch."""

    def __init__(self, total_questions: int, batch_size: int, max_new_tokens: int, label: str):
        from tqdm.auto import tqdm

        self.max_new_tokens, self.done = max_new_tokens, 0
        batches = -(-total_questions // batch_size)
        self.total_questions = total_questions
        self.bar = tqdm(total=batches * max_new_tokens, desc=label, unit="tok", file=sys.stderr, leave=False,
                        dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix} [{elapsed}<{remaining}]")
        self.bar.set_postfix_str(f"0/{total_questions} answers")
        self.steps = 0

    def streamer(self) -> Any:
        from transformers.generation.streamers import BaseStreamer

        progress = self

        class Streamer(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                progress.steps += 1
                progress.bar.update(1)

            def end(self) -> None:
                pass

        return Streamer()

    def batch_done(self, answered: int) -> None:
        """A batch ended (at EOS or at the budget): count its answers and skip the steps it did not need."""
        self.bar.update(self.max_new_tokens - self.steps)
        self.steps = 0
        self.done += answered
        self.bar.set_postfix_str(f"{self.done}/{self.total_questions} answers")

    def close(self) -> None:
        self.bar.close()


@torch.no_grad()
def answer_batch(model: Any, tokenizer: Any, fmt: PromptFormat, questions: list[str] | list[Sample], max_new_tokens: int = 512,
                 temperature: float = 0.0, top_p: float = 0.95, batch_size: int = 8,
                 progress: str | None = None) -> list[Answer]:
    """Answer several questions, `batch_size` at a time (left-padded prompts; same tokens as one by one, up to
    floating-point ties). A Sample is prompted with its system message and earlier turns. `progress`: a
    label to show a progress bar on stderr while generating."""
    answers: list[Answer] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    bar = TokenProgress(len(questions), batch_size, max_new_tokens, progress) if progress and questions else None
    try:
        for i in range(0, len(questions), batch_size):
            chunk = questions[i: i + batch_size]
            prompts = [_prompt(fmt, q) for q in chunk]
            inputs = encode_prompt(tokenizer, prompts, return_tensors="pt", padding=True).to(model.device)
            kwargs = _generation_kwargs(tokenizer, max_new_tokens, temperature, top_p)
            if bar is not None:
                kwargs["streamer"] = bar.streamer()
            output = model.generate(**inputs, **kwargs)
            width = inputs["input_ids"].shape[1]
            answers += [_to_answer(q if isinstance(q, str) else q.question, output[row, width:].tolist(), tokenizer)
                        for row, q in enumerate(chunk)]
            if bar is not None:
                bar.batch_done(len(chunk))
    finally:
        tokenizer.padding_side = side
        if bar is not None:
            bar.close()
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
    return f"{head}[thinking]\n{ans.thinking}\n[answer]\n{ans.answer or '(none)'}\n{status_line(ans)}"


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


class Model:
    """A base model (+ adapter) loaded once, to answer questions again and again (what `thinktune.load` returns).

    adapter: an adapter folder (output_dir or checkpoint-N) or None for the base alone; base: the base model
    (default: the one the adapter names); template: the prompt template (default: the adapter's).
    """

    def __init__(self, adapter: str | Path | None = None, base: str | None = None, template: str | None = None,
                 trust_remote_code: bool = False):
        from transformers.utils import logging as hf_logging

        self.adapter = str(adapter) if adapter is not None else None
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # loading is quiet, as in the CLI; restored after
        try:
            self.model, self.tokenizer, self.model_config = load_with_adapter(adapter, base,
                                                                              trust_remote_code=trust_remote_code)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self.base = base or self.model_config.name_or_path
        self.format, self.template_source = prompt_format_and_source(adapter, template, self.tokenizer, base)

    def __repr__(self) -> str:
        return f"Model(adapter={self.adapter!r}, base={self.base!r}, template={self.format.template!r})"

    def answer(self, question: str, max_new_tokens: int = 512, temperature: float = 0.0,
               on_text: Callable[[str], None] | None = None) -> Answer:
        """One answer; on_text receives the text as it is generated."""
        return answer(self.model, self.tokenizer, self.format, question, max_new_tokens, temperature, on_text=on_text)

    def answers(self, questions: list[str], max_new_tokens: int = 512, temperature: float = 0.0,
                batch_size: int = 8, progress: str | None = None) -> list[Answer]:
        """Several answers, batched; progress: a label for a progress bar on stderr."""
        return answer_batch(self.model, self.tokenizer, self.format, questions, max_new_tokens, temperature,
                            batch_size=batch_size, progress=progress)

    def compare(self, question: str, max_new_tokens: int = 512, temperature: float = 0.0) -> tuple[Answer, Answer]:
        """(base, tuned) answers to one question: the adapter switched off, then on."""
        if self.adapter is None:
            raise UserError("comparing base and tuned needs an adapter (--adapter DIR)")
        with self.model.disable_adapter():
            before = self.answer(question, max_new_tokens, temperature)
        return before, self.answer(question, max_new_tokens, temperature)

    def generate(self, questions: str | list[str], max_new_tokens: int = 512, temperature: float = 0.0,
                 compare: bool = False, show: bool = False) -> Any:
        """Answer a question (-> one dict) or a list of questions (-> a list of dicts), with the thinking and
        the answer apart. compare=True: {"question", "base", "tuned"} per question. Prints nothing unless
        show=True (then each answer once, and a progress bar for several questions)."""
        single = isinstance(questions, str)
        items = [questions] if single else list(questions)
        results: list[dict[str, Any]] = []
        if compare:
            for question in items:
                before, after = self.compare(question, max_new_tokens, temperature)
                results.append({"question": question, "base": before.as_dict(), "tuned": after.as_dict()})
                if show:
                    print(f"\n### {question}\n" + side_by_side(format_answer(before), format_answer(after)))
        else:
            label = f"answering {len(items)} questions" if show and len(items) > 1 else None
            for ans in self.answers(items, max_new_tokens, temperature, progress=label):
                results.append(ans.as_dict())
                if show:
                    print(f"\n### {ans.question}\n{format_answer(ans)}")
        return results[0] if single else results


def status_line(ans: Answer) -> str:
    status = "closed </think>" if ans.closed_think else "no </think>"
    status += ", stopped at EOS" if ans.stopped_at_eos else f", hit the {ans.new_tokens}-token limit"
    return f"({status}, {ans.new_tokens} tokens)"


def generate(questions: Iterable[str], adapter: str | None = None, base: str | None = None, template: str | None = None,
             max_new_tokens: int = 512, temperature: float = 0.0, compare: bool = False, stream: bool = True,
             batch: bool = False, out: Callable[[str], None] = print,
             trust_remote_code: bool = False) -> list[dict[str, Any]]:
    """What `thinktune generate` prints: each answer once. stream=True shows the text as it is generated (then
    only the status line); batch=True answers all questions batched behind a progress bar, then prints them.
    trust_remote_code: the user's permission for the model's own code (never read from the adapter folder)."""
    loaded = Model(adapter, base, template, trust_remote_code=trust_remote_code)
    out(f"prompt template: {loaded.format.template} (from {loaded.template_source})")
    items = list(questions)
    if compare:
        results = loaded.generate(items, max_new_tokens, temperature, compare=True)
        for result in results:
            out(f"\n### {result['question']}")
            out(side_by_side(format_answer(Answer(**result["base"])), format_answer(Answer(**result["tuned"]))))
        return results
    if not stream or batch:
        label = f"answering {len(items)} questions" if batch else None
        answers = loaded.answers(items, max_new_tokens, temperature, progress=label)
        for ans in answers:
            out(f"\n### {ans.question}\n{format_answer(ans)}")
        return [ans.as_dict() for ans in answers]
    results = []
    for question in items:
        out(f"\n### {question}")
        ans = loaded.answer(question, max_new_tokens, temperature, on_text=lambda text: print(text, end="", flush=True))
        print()
        out(status_line(ans))
        results.append(ans.as_dict())
    return results


def generate_command(args: Any) -> int:
    """`thinktune generate [QUESTION ...] --adapter DIR | --base MODEL [--compare] [--file F] [--out F.jsonl]`."""
    questions = list(args.questions)
    if args.file:
        questions += read_questions(args.file)  # before any loading: a missing file is reported at once
    if not questions:
        raise UserError('give a question ("...") or --file questions.jsonl')
    if args.compare and not args.adapter:
        raise UserError("--compare needs --adapter (it compares base and tuned)")
    if args.adapter:
        check_adapter_dir(args.adapter)
    results = generate(questions, adapter=args.adapter, base=args.base, template=args.template,
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature, compare=args.compare,
                       stream=not args.no_stream, batch=bool(args.file), trust_remote_code=args.trust_remote_code)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results), encoding="utf-8")
        print(f"wrote {len(results)} answers to {args.out}")
    return 0
