"""Rollouts: batched sampling of completions on the model being trained, with a KV cache.

Prompts are rendered by the run's `PromptFormat` and tokenised exactly as `thinktune generate` does
(the prompt ends with the '<think>\\n' prefill), left-padded into one batch; the prompt runs once, then
one token per forward with the cache (transformers' `past_key_values`). Each step takes the last
logits, divides by the temperature, keeps the top-p nucleus (as transformers' `TopPLogitsWarper`) and
draws with a caller-owned `torch.Generator`, so the same generator state gives the same completions
(a resumed run re-seeds it from its position). temperature 0 is greedy and gives the same tokens as
`thinktune generate`. A completion ends at EOS (kept, and counted) or at `max_new_tokens` (truncated).
This module samples only; it never computes a loss and never changes a weight.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from thinktune.data import PromptFormat, split_thinking
from thinktune.rl.rewards import Completion


@dataclass
class Rollout:
    """A batch of prompts and their sampled completions, in the layout the training forward reuses."""

    prompt_ids: torch.Tensor
    """(B, P) left-padded prompt ids."""
    prompt_mask: torch.Tensor
    """(B, P) 1 on prompt tokens, 0 on left padding."""
    completion_ids: torch.Tensor
    """(B, C) sampled ids, right-padded with the pad id after EOS."""
    completion_mask: torch.Tensor
    """(B, C) 1 on sampled tokens up to and including EOS."""
    stopped: torch.Tensor
    """(B,) bool: the completion reached EOS (False: truncated at max_new_tokens)."""

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)


def prompt_token_ids(fmt: PromptFormat, tokenizer: Any, questions: Sequence[str]) -> list[list[int]]:
    """The inference prompt of each question, tokenised as `thinktune generate` tokenises it."""
    return [list(tokenizer(fmt.prompt(q), add_special_tokens=True)["input_ids"]) for q in questions]


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set logits outside the top-p nucleus to -inf (transformers' TopPLogitsWarper rule, min 1 token kept)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_index = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, sorted_index, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy (temperature 0) or a draw from softmax(top_p(logits / temperature))."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = top_p_filter(logits.float() / temperature, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def cache_keyword(model: Any) -> str:
    """The KV-cache argument (and output field) of the model's forward: `cache` in transformers 5.24 (checked
    on 5.24.0), `past_key_values` before the rename (4.56-5.x)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def position_ids_of(mask: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 on each row's first real token (left padding gets 0)."""
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)


@torch.no_grad()
def sample(model: Any, prompts: Sequence[Sequence[int]], *, eos_id: int, pad_id: int, max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None) -> Rollout:
    """Sample one completion per prompt (repeat a prompt G times for a group), in eval mode (no dropout)."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    batch = len(prompts)
    completion = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((batch, max_new_tokens), dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    mask = prompt_mask.to(device)
    positions = position_ids_of(mask)
    cache_name = cache_keyword(model)
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=prompt_ids.to(device), attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1)
        for t in range(max_new_tokens):
            token = next_tokens(out.logits[:, -1].float(), temperature, top_p, generator).cpu()
            token = torch.where(done, torch.full_like(token, pad_id), token)
            completion[:, t] = token
            completion_mask[:, t] = (~done).long()
            done |= token == eos_id
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=token[:, None].to(device), attention_mask=mask, position_ids=positions,
                        use_cache=True, **{cache_name: getattr(out, cache_name)})
    finally:
        model.train(was_training)
    return Rollout(prompt_ids, prompt_mask, completion, completion_mask, done.clone())


def decode_completions(rollout: Rollout, tokenizer: Any, prompts_text: Sequence[str]) -> list[Completion]:
    """Decode each completion (up to, not including, EOS) and split thinking from answer."""
    completions = []
    for row, prompt in enumerate(prompts_text):
        length = int(rollout.completion_mask[row].sum())
        ids = rollout.completion_ids[row, :length].tolist()
        stopped = bool(rollout.stopped[row])
        text = tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True)
        thinking, answer, closed = split_thinking(text)
        thinking_tokens = len(tokenizer(thinking, add_special_tokens=False)["input_ids"]) if thinking else 0
        completions.append(Completion(prompt, text, thinking, answer, closed, stopped, length, thinking_tokens))
    return completions


def completion_logps(model: Any, rollout: Rollout, temperature: float = 1.0,
                     disable_adapter: bool = False) -> torch.Tensor:
    """Log-probabilities (B, C) of the sampled completion tokens under `model` (the training forward).

    Uses the rollout's own layout (left-padded prompt, then the completion) and only the logits of the
    completion positions; divides by the sampling temperature as TRL does. With `disable_adapter` the
    reference model is the same weights with the LoRA adapter switched off (PEFT's context).
    """
    device = next(model.parameters()).device
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1).to(device)
    mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1).to(device)
    width = rollout.completion_ids.shape[1]
    context = model.disable_adapter() if disable_adapter else contextlib.nullcontext()
    with context:
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_of(mask),
                       use_cache=False, logits_to_keep=width + 1).logits[:, :-1]
    if temperature > 0:
        logits = logits.float() / temperature
    targets = rollout.completion_ids.to(device)
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
