"""Formats: turn the rows users bring into `Sample`s (question, thinking, answer, earlier turns).

Four layouts are understood, detected from the columns (or forced with `data.format`):

- columns:  one column each for question, chain of thought and answer (the seed's
            Question / Complex_CoT / Response; also question/answer, prompt/reasoning_content/
            content, TRL's prompt/completion, as text or as lists of role/content turns). Without a CoT column the thinking comes from a `<think>...</think>`
            block inside the answer, or is empty;
- alpaca:   instruction / input / output (input appended to the instruction);
- sharegpt: `conversations`, a list of {from: system|human|gpt, value};
- messages: OpenAI `messages`, a list of {role: system|user|assistant, content}; an
            assistant turn may carry DeepSeek's `reasoning_content`.

Everywhere an answer may hold `<think>...</think>answer`; it is split so the thinking is
never wrapped in a second `<think>`. A row without any CoT trains its answer after an
empty think block, as R1 does. The last assistant turn is the completion; earlier turns
become `Sample.history`. This module reads rows only: no tokenizer, no files.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from thinktune.config import DataConfig
from thinktune.errors import UserError, did_you_mean

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
FORMATS = ("columns", "alpaca", "sharegpt", "messages")
# Column names other tools use, most likely first (matched case-insensitively).
QUESTION_NAMES = ("question", "prompt", "problem", "query", "instruction", "input")
COT_NAMES = ("complex_cot", "cot", "reasoning_content", "reasoning", "thinking", "think", "thought", "thoughts",
             "chain_of_thought", "rationale")
ANSWER_NAMES = ("response", "answer", "output", "completion", "solution", "content")
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "model": "assistant", "bot": "assistant"}


@dataclass
class Turn:
    """One earlier turn of a conversation: a user question or an assistant answer (with its thinking)."""

    role: str
    content: str
    thinking: str = ""


@dataclass
class Sample:
    """One training row: the last question, its thinking and answer, plus the conversation before it."""

    question: str
    cot: str
    response: str
    system: str | None = None
    history: list[Turn] = field(default_factory=list)


@dataclass
class Mapping:
    """Which layout a data set has and which columns fill which part of a Sample."""

    format: str
    question: str | None = None
    cot: str | None = None
    response: str | None = None
    conversation: str | None = None
    extra: str | None = None  # alpaca's input column

    def notice(self) -> str:
        if self.format == "columns":
            thinking = self.cot or f"a <think> block in {self.response}, else empty"
            return f"columns (question <- {self.question}, thinking <- {thinking}, answer <- {self.response})"
        if self.format == "alpaca":
            question = self.question + (f" + {self.extra}" if self.extra else "")
            return f"alpaca (question <- {question}, thinking <- a <think> block in {self.response}, else empty, answer <- {self.response})"
        keys = "from/value" if self.format == "sharegpt" else "role/content"
        return (f"{self.format} ({self.conversation}: {keys} turns; the last assistant turn is trained, its thinking from "
                f"reasoning_content or a <think> block, else empty)")


def split_think(text: str) -> tuple[str, str]:
    """'<think>t</think>a' (or R1's 't</think>a') -> ('t', 'a'); text without a block -> ('', text)."""
    body = text.strip()
    if THINK_CLOSE not in body:
        if body.startswith(THINK_OPEN):  # an unclosed block: all thinking, no answer
            return body[len(THINK_OPEN):].strip(), ""
        return "", body
    thinking, answer = body.split(THINK_CLOSE, 1)
    thinking = thinking.strip()
    if thinking.startswith(THINK_OPEN):
        thinking = thinking[len(THINK_OPEN):].strip()
    return thinking, answer.strip()


def unwrap_think(text: str) -> str:
    """A CoT written as '<think>...</think>' loses its tags (they are added once, by the template)."""
    body = text.strip()
    if body.startswith(THINK_OPEN):
        body = body[len(THINK_OPEN):]
        body = body[: body.rindex(THINK_CLOSE)] if THINK_CLOSE in body else body
    return body.strip()


# ----------------------------------------------------------------------------- detection

def _find(columns: Sequence[str], names: Sequence[str], taken: Sequence[str] = ()) -> str | None:
    lower = {c.lower(): c for c in columns if c not in taken}
    return next((lower[n] for n in names if n in lower), None)


def detect(columns: Sequence[str], cfg: DataConfig, source: str) -> Mapping:
    """The mapping for these columns: `data.format` when set, else the configured columns, else by the names."""
    forced = cfg.format
    configured = [c for c in (cfg.question_column, cfg.cot_column, cfg.response_column) if c]
    if forced == "columns" or (forced == "auto" and all(c in columns for c in configured)):
        missing = [c for c in configured if c not in columns]
        if missing:
            raise UserError(_missing_message(source, missing, columns))
        return Mapping("columns", cfg.question_column, cfg.cot_column, cfg.response_column)
    if forced in ("messages", "sharegpt") or forced == "auto":
        preferred = ("messages", "conversations") if forced != "sharegpt" else ("conversations", "messages")
        column = _find(columns, preferred)
        if column:
            return Mapping(forced if forced != "auto" else ("messages" if column.lower() == "messages" else "sharegpt"),
                           conversation=column)
        if forced != "auto":
            raise UserError(f"{source}: data.format={forced} needs a 'messages' or 'conversations' column; "
                            f"columns found: {', '.join(columns) or 'none'}")
    if forced in ("alpaca", "auto"):
        instruction, output = _find(columns, ("instruction",)), _find(columns, ("output",))
        if instruction and output:
            return Mapping("alpaca", instruction, None, output, extra=_find(columns, ("input",)))
        if forced == "alpaca":
            raise UserError(f"{source}: data.format=alpaca needs 'instruction' and 'output' columns; "
                            f"columns found: {', '.join(columns) or 'none'}")
    question = _find(columns, QUESTION_NAMES)
    response = _find(columns, ANSWER_NAMES, [question] if question else [])
    if question and response:
        cot = _find(columns, COT_NAMES, [question, response])
        return Mapping("columns", question, cot, response)
    raise UserError(_missing_message(source, [c for c in configured if c not in columns], columns))


def _missing_message(source: str, missing: Sequence[str], columns: Sequence[str]) -> str:
    """The error for unmapped columns, with overrides that name real columns (so they load)."""
    question = _find(columns, QUESTION_NAMES) or _closest(columns, "Question", [])
    response = _find(columns, ANSWER_NAMES, [question or ""]) or _closest(columns, "Response", [question])
    cot = _find(columns, COT_NAMES, [question or "", response or ""]) or _closest(columns, "Complex_CoT", [question, response])
    named = [c for c in (question, cot, response) if c]
    if len(set(named)) == 3 and not any(_find([c], QUESTION_NAMES + COT_NAMES + ANSWER_NAMES) for c in named):
        question, cot, response = [c for c in columns if c in named][:3]  # nothing known: take them in file order
    if not question or not response:
        hint = "name a question and an answer column with data.question_column=... data.response_column=..."
    else:
        hint = (f"map them with data.question_column={question} data.cot_column={cot or 'null'} "
                f"data.response_column={response}")
    return (f"{source}: missing column(s) {', '.join(missing)}; columns found: {', '.join(columns) or 'none'}; {hint} "
            f"(or data.format=alpaca|sharegpt|messages)")


def _closest(columns: Sequence[str], wanted: str, taken: Sequence[str | None]) -> str | None:
    free = [c for c in columns if c not in taken]
    close = did_you_mean(wanted, free)
    if close:
        return close.split("'")[1]
    return free[0] if free else None


# ----------------------------------------------------------------------------- conversion

def _text(value: Any) -> str | None:
    """A field as text: strings as they are, OpenAI content parts joined; None for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        texts = [p.get("text") for p in value if p.get("type", "text") == "text"]
        if texts and all(isinstance(t, str) for t in texts):
            return "".join(texts)
    return None


def convert(row: dict[str, Any], mapping: Mapping) -> Sample | str:
    """A Sample, or the reason the row cannot be used (a short phrase naming the field)."""
    if mapping.format in ("columns", "alpaca"):
        return _from_columns(row, mapping)
    return _from_turns(row, mapping)


def _is_turns(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, dict) and ("role" in t or "from" in t) for t in value)


def _from_columns(row: dict[str, Any], mapping: Mapping) -> Sample | str:
    prompt, answer_turns = row.get(mapping.question or ""), row.get(mapping.response or "")
    if _is_turns(prompt) and _is_turns(answer_turns):  # TRL's conversational prompt/completion
        name = f"{mapping.question}+{mapping.response}"
        return _from_turns({name: prompt + answer_turns}, Mapping("messages", conversation=name))
    question, response = _text(row.get(mapping.question or "")), _text(row.get(mapping.response or ""))
    bad = [name for name, value in ((mapping.question, question), (mapping.response, response))
           if value is None or not value.strip()]
    cot_value = row.get(mapping.cot) if mapping.cot else ""
    cot = _text(cot_value) if cot_value is not None else None
    if mapping.cot and (cot is None or not cot.strip()):
        bad.insert(1, mapping.cot)
    if bad:
        return f"an empty or non-text {', '.join(str(b) for b in bad)}"
    assert question is not None and response is not None and cot is not None
    thinking, answer = split_think(response)
    if mapping.extra:
        extra = _text(row.get(mapping.extra))
        if extra and extra.strip():
            question = f"{question.strip()}\n\n{extra.strip()}"
    if not answer:
        return f"no answer after </think> in {mapping.response}"
    return Sample(question.strip(), unwrap_think(cot) if cot.strip() else thinking, answer)


def _from_turns(row: dict[str, Any], mapping: Mapping) -> Sample | str:
    turns = row.get(mapping.conversation or "")
    if not isinstance(turns, list) or not turns:
        return f"an empty or non-list {mapping.conversation}"
    system: str | None = None
    parsed: list[Turn] = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            return f"turn {number} of {mapping.conversation} that is not an object"
        role = ROLES.get(str(turn.get("role", turn.get("from", ""))).lower())
        content = _text(turn.get("content", turn.get("value")))
        if role is None or content is None:
            return f"turn {number} of {mapping.conversation} without a known role/from and text content/value"
        if role == "system":
            system = system or content.strip()
            continue
        if role == "assistant":
            reasoning = _text(turn.get("reasoning_content", turn.get("thinking", turn.get("reasoning")))) or ""
            thinking, answer = split_think(content)
            parsed.append(Turn("assistant", answer, unwrap_think(reasoning) if reasoning.strip() else thinking))
        else:
            parsed.append(Turn("user", content.strip()))
    if not parsed or parsed[-1].role != "assistant" or not parsed[-1].content:
        return f"no final assistant answer in {mapping.conversation}"
    if len(parsed) < 2 or parsed[-2].role != "user" or not parsed[-2].content:
        return f"no user question before the last assistant turn in {mapping.conversation}"
    last, question = parsed[-1], parsed[-2]
    return Sample(question.content, last.thinking, last.content, system, parsed[:-2])
