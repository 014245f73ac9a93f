"""Serve engine: one base model, several adapters, one worker thread that generates for a queue of requests.

Requests never interleave: a single worker takes one job at a time, selects its adapter (PEFT
`set_adapter`, under a lock), and decodes token by token with the KV cache. Each job streams
events back through a callback. The prompt is `PromptFormat.prompt()` (the training prefix that
ends in '<think>\\n'); the generated text is split with `split_thinking`, the function `generate`
uses, so the server and `thinktune generate` agree. A thinking budget closes the thinking block
with the training format's own closing text and goes on to the answer.
This module knows nothing of HTTP.
"""
from __future__ import annotations

import contextlib
import queue
import random
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from thinktune.compat import kv_cache_argument
from thinktune.data import THINK_CLOSE, PromptFormat, eos_id, split_thinking


@dataclass
class ServedModel:
    """One model id of the server: an adapter of the shared base (or the base alone) and its prompt format."""

    name: str
    adapter_name: str | None  # the PEFT adapter's name; None = the base as loaded
    fmt: PromptFormat
    template_from: str
    source: str


@dataclass
class Job:
    """One request for the worker. `emit` receives ("delta", reasoning, content) and ("done", finish, usage)."""

    served: ServedModel
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[tuple], None]
    thinking: bool = True
    max_thinking_tokens: int | None = None
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)


class StreamSplit:
    """Turns the growing generated text into (reasoning, content) deltas that add up to the final split.

    Text that could still become '</think>', a stop string or a whole UTF-8 character is held back;
    whitespace at the ends is dropped as `split_thinking` drops it, so the streamed pieces join to
    exactly the non-streamed answer.
    """

    def __init__(self, thinking: bool, stops: list[str]):
        self.thinking, self.stops = thinking, [s for s in stops if s]
        self.reasoning, self.content = "", ""
        self.stopped = False

    def update(self, text: str, final: bool = False) -> tuple[str, str]:
        reasoning, content = self.split(text, final)
        delta = (reasoning[len(self.reasoning):] if reasoning.startswith(self.reasoning) else "",
                 content[len(self.content):] if content.startswith(self.content) else "")
        self.reasoning, self.content = self.reasoning + delta[0], self.content + delta[1]
        return delta

    def split(self, text: str, final: bool) -> tuple[str, str]:
        if not final:
            text = text.rstrip("\ufffd")  # an incomplete UTF-8 character
        if self.thinking:
            if THINK_CLOSE not in text and not final:
                text = text[: len(text) - _partial_suffix(text, [THINK_CLOSE])]
            reasoning, content, _ = split_thinking(text)
        else:
            reasoning, content = "", text
        for stop in self.stops:
            if stop in content:
                content, self.stopped = content[: content.index(stop)], True
        if self.thinking:
            content = content.strip()
        if not final and not self.stopped:
            content = content[: len(content) - _partial_suffix(content, self.stops)]
        return reasoning, content.rstrip() if self.thinking else content


def _partial_suffix(text: str, words: list[str]) -> int:
    """Length of the longest end of `text` that is the start of one of `words` (and could still complete it)."""
    best = 0
    for word in words:
        for size in range(min(len(word) - 1, len(text)), best, -1):
            if word.startswith(text[-size:]):
                best = size
                break
    return best


class Engine:
    """Owns the model and its tokenizer; `submit` queues a job, the worker thread runs jobs in order."""

    def __init__(self, model: Any, tokenizer: Any, served: dict[str, ServedModel], context_length: int):
        self.model, self.tokenizer, self.served = model, tokenizer, served
        self.context_length = context_length
        self.default_max_tokens = 2048
        self.cache_name = kv_cache_argument(model)
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.adapter_lock = threading.Lock()
        self.worker = threading.Thread(target=self._work, name="thinktune-serve-worker", daemon=True)
        self.worker.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self.worker.join(timeout=10)

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            try:
                with torch.inference_mode(), self._adapter(job.served):
                    self._generate(job)
            except Exception as exc:  # reported to the client as a server error; the worker goes on
                job.emit(("error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"))

    @contextlib.contextmanager
    def _adapter(self, served: ServedModel) -> Any:
        with self.adapter_lock:
            if served.adapter_name is not None:
                self.model.set_adapter(served.adapter_name)
            yield

    def _next_token(self, logits: torch.Tensor, job: Job, generator: torch.Generator) -> int:
        if job.temperature <= 0:
            return int(logits.argmax())
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        scores = TemperatureLogitsWarper(job.temperature)(None, logits[None].float())
        if job.top_p < 1.0:
            scores = TopPLogitsWarper(job.top_p)(None, scores)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs[0].cpu(), 1, generator=generator))

    def _generate(self, job: Job) -> None:
        tokenizer, fmt = self.tokenizer, job.served.fmt
        generator = torch.Generator().manual_seed(job.seed if job.seed is not None else random.getrandbits(63))
        closing = tokenizer(fmt.completion("", "\x00").split("\x00")[0], add_special_tokens=False)["input_ids"]
        eos = eos_id(tokenizer)
        split = StreamSplit(job.thinking, job.stop)
        device = next(self.model.parameters()).device
        feed = torch.tensor([job.prompt_ids], device=device)
        past, new_ids = None, []
        forced = list(closing) if job.thinking and job.max_thinking_tokens == 0 else []
        reasoning_tokens, finish = 0, "length"
        for _ in range(job.max_tokens):
            if job.cancelled.is_set():
                finish = "cancelled"
                break
            out = self.model(input_ids=feed, use_cache=True, **{self.cache_name: past})
            past = getattr(out, self.cache_name)
            token = forced.pop(0) if forced else self._next_token(out.logits[0, -1], job, generator)
            if token == eos:
                finish = "stop"
                break
            new_ids.append(token)
            feed = torch.tensor([[token]], device=device)
            text = tokenizer.decode(new_ids, skip_special_tokens=True)
            thinking_open = job.thinking and THINK_CLOSE not in text
            if thinking_open:
                reasoning_tokens += 1
                budget = job.max_thinking_tokens
                if budget is not None and reasoning_tokens >= budget and not forced:
                    forced = list(closing)
            delta = split.update(text)
            if any(delta):
                job.emit(("delta", *delta))
            if split.stopped:
                finish = "stop"
                break
        if finish == "cancelled":
            print(f"request for '{job.served.name}' cancelled after {len(new_ids)} tokens: the client went away", flush=True)
            return
        delta = split.update(tokenizer.decode(new_ids, skip_special_tokens=True), final=True)
        if any(delta):
            job.emit(("delta", *delta))
        usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": len(new_ids) + (finish == "stop" and not split.stopped),
                 "total_tokens": 0, "completion_tokens_details": {"reasoning_tokens": reasoning_tokens}}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        job.emit(("done", finish, usage))
