"""The GRPO objective: rollouts as the batch source, the GRPO-family loss as the objective.

`RolloutBatches` is the loop's batch source for `train.objective: grpo`. Micro-batch i of the run takes
`train.batch_size` problems (a (seed, epoch)-fixed order, as SFT's micro-batches), samples
`rl.group_size` completions for each on the current weights (`rollout.sample`), scores them
(`rewards.score`), turns rewards into group advantages (`loss.group_advantages`) and drops the
groups whose rewards are all equal (counted: they carry no signal). Its sampling generator is seeded
from (train.seed, i), so a resumed run samples exactly the completions an uninterrupted run samples.
With rl.beta > 0 it also stores the reference log-probabilities (the same model with the adapter
switched off, PEFT's `disable_adapter()`; no second copy of the weights).

`GRPOObjective` is the loss the training step runs on such a micro-batch: the log-probabilities of
the sampled tokens under the current weights, the clipped surrogate (+ beta x KL), and the chosen
normalisation as a (numerator, count) pair; the step divides by the count of the whole step.
One optimisation step per generation (TRL's default num_iterations=1): the ratio is 1 in value and
the clip is inactive, so `clip_fraction` stays 0 (it is logged for the day several steps reuse a
generation).

`evaluate_problems` scores greedy answers to held-out problems (accuracy, format rate, rewards).
This module never writes checkpoints or metrics files; the loop does.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from thinktune.config import RLConfig
from thinktune.data import PromptFormat, eos_id, epoch_batches
from thinktune.objective import ObjectiveOutput
from thinktune.rl.loss import PolicyLoss, group_advantages, policy_loss
from thinktune.rl.problems import Problem
from thinktune.rl.rewards import Completion, answer_matches, build_rewards, format_reward, score
from thinktune.rl.rollout import Rollout, completion_logps, decode_completions, prompt_token_ids, sample

ROLLOUT_SEED_STRIDE = 2**32


def rollout_generator(seed: int, micro_batch: int, device: torch.device) -> torch.Generator:
    """The sampling generator of micro-batch `micro_batch` of the run: a function of (seed, position) only."""
    return torch.Generator(device=device).manual_seed((seed % ROLLOUT_SEED_STRIDE) * ROLLOUT_SEED_STRIDE + micro_batch)


@dataclass
class RolloutStats:
    """What the rollouts of a logging window looked like (summed; `summary()` gives the means)."""

    components: dict[str, list[float]] = field(default_factory=dict)
    rewards: list[float] = field(default_factory=list)
    correct: int = 0
    well_formed: int = 0
    completions: int = 0
    completion_tokens: int = 0
    truncated: int = 0
    groups: int = 0
    zero_variance_groups: int = 0
    rollout_seconds: float = 0.0
    kl_sum: float = 0.0
    clipped_tokens: int = 0
    loss_tokens: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, values in self.components.items():
            out[f"reward/{name}"] = round(statistics.fmean(values), 6)
            out[f"reward/{name}_std"] = round(statistics.pstdev(values), 6)
        if self.rewards:
            out["reward"] = round(statistics.fmean(self.rewards), 6)
            out["reward_std"] = round(statistics.pstdev(self.rewards), 6)
        n = max(1, self.completions)
        out.update({"accuracy": round(self.correct / n, 6), "format_rate": round(self.well_formed / n, 6),
                    "completion_length": round(self.completion_tokens / n, 2), "truncation_rate": round(self.truncated / n, 6),
                    "zero_variance_groups": self.zero_variance_groups, "groups": self.groups,
                    "rollout_seconds": round(self.rollout_seconds, 3),
                    "kl": round(self.kl_sum / max(1, self.loss_tokens), 6),
                    "clip_fraction": round(self.clipped_tokens / max(1, self.loss_tokens), 6),
                    "samples": self.samples})
        return out


class RolloutBatches:
    """The batch source of a GRPO run: micro-batch i = rollouts for the i-th batch of problems."""

    def __init__(self, model: Any, tokenizer: Any, fmt: PromptFormat, problems: list[Problem], rl: RLConfig,
                 batch_size: int, seed: int, grad_accum: int = 1, rank: int = 0, world_size: int = 1):
        self.model, self.tokenizer, self.fmt, self.problems, self.rl = model, tokenizer, fmt, problems, rl
        self.batch_size, self.seed = batch_size, seed
        self.grad_accum, self.rank, self.world_size = grad_accum, rank, world_size
        self.rewards = build_rewards(rl)
        self.eos, self.pad = eos_id(tokenizer), tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)
        self.per_epoch = math.ceil(len(problems) / batch_size)
        self.stats = RolloutStats()
        self._epoch, self._batches = -1, []  # type: ignore[var-annotated]

    def indices(self, index: int) -> list[int]:
        epoch = index // self.per_epoch
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(len(self.problems), self.batch_size, self.seed, epoch)
        return self._batches[index % self.per_epoch]

    @property
    def per_step(self) -> int:
        """Micro-batches of the run one optimizer step consumes (over all ranks)."""
        return self.grad_accum * self.world_size

    def for_step(self, position: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the step starting at micro-batch `position` (as SFT's batch source)."""
        return self.step([position + self.rank + i * self.world_size for i in range(self.grad_accum)])

    def step(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """One optimizer step's micro-batches, all sampled on the current weights."""
        return [self.batch(i) for i in indices]

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        rl, group = self.rl, self.rl.group_size
        problems = [self.problems[j] for j in self.indices(index)]
        questions = [p.question for p in problems for _ in range(group)]
        device = next(self.model.parameters()).device
        started = time.perf_counter()
        rollout = sample(self.model, prompt_token_ids(self.fmt, self.tokenizer, questions), eos_id=self.eos,
                         pad_id=self.pad, max_new_tokens=rl.max_completion_tokens, temperature=rl.temperature,
                         top_p=rl.top_p, generator=rollout_generator(self.seed, index, device))
        self.stats.rollout_seconds += time.perf_counter() - started
        completions = decode_completions(rollout, self.tokenizer, [self.fmt.prompt(q) for q in questions])
        references = [p.reference for p in problems for _ in range(group)]
        rows = [p.row for p in problems for _ in range(group)]
        scores = score(completions, references, rows, self.rewards)
        advantages = group_advantages(torch.tensor(scores.total), group, rl.scale_rewards)
        self.record(questions, completions, references, scores.components, scores.total, rollout,
                    advantages.zero_variance)
        keep = (~advantages.zero_variance).repeat_interleave(group)
        kept = Rollout(*(t[keep] for t in (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                            rollout.completion_mask, rollout.stopped)))
        batch = as_batch(kept)
        if rl.mask_truncated_completions:
            batch["loss_mask"][~batch["stopped"]] = 0
        batch["advantages"] = advantages.advantages[keep]
        if rl.beta > 0 and int(keep.sum()):
            with torch.no_grad():
                batch["ref_logps"] = completion_logps(self.model, as_rollout(batch), rl.temperature,
                                                      disable_adapter=True).cpu()
        return batch

    def record(self, questions: Sequence[str], completions: Sequence[Completion], references: Sequence[str],
               components: dict[str, list[float]], totals: list[float], rollout: Rollout,
               zero_variance: torch.Tensor) -> None:
        st = self.stats
        for name, values in components.items():
            st.components.setdefault(name, []).extend(values)
        st.rewards.extend(totals)
        st.correct += sum(answer_matches(c.answer, r, self.rl.numeric_tolerance) for c, r in zip(completions, references))
        st.well_formed += sum(format_reward(c) == 1.0 for c in completions)
        st.completions += len(completions)
        st.completion_tokens += int(rollout.lengths.sum())
        st.truncated += int((~rollout.stopped).sum())
        st.groups += int(zero_variance.numel())
        st.zero_variance_groups += int(zero_variance.sum())
        if not st.samples and completions:  # one example per logging window, for the report
            st.samples.append({"question": questions[0], "completion": completions[0].text,
                               "reference": references[0], "reward": totals[0]})

    def take_stats(self) -> RolloutStats:
        """The stats since the last call."""
        stats, self.stats = self.stats, RolloutStats()
        return stats

    def window_metrics(self) -> dict[str, Any]:
        """What the rollouts since the last call looked like (the loop logs it with each train record)."""
        return self.take_stats().summary()


def as_batch(rollout: Rollout) -> dict[str, torch.Tensor]:
    """The rollout as a micro-batch: input_ids / attention_mask = prompt then completion (the columns that are
    padding in every row cut off), `loss_mask` over the last `loss_mask.shape[1]` positions, `stopped`."""
    prompt_used = rollout.prompt_mask.any(dim=0).nonzero()
    start = int(prompt_used[0]) if len(prompt_used) else rollout.prompt_mask.shape[1]
    width = int(rollout.completion_mask.sum(dim=1).max()) if len(rollout.completion_mask) else 0
    completion_mask = rollout.completion_mask[:, :width]
    return {"input_ids": torch.cat([rollout.prompt_ids[:, start:], rollout.completion_ids[:, :width]], dim=1),
            "attention_mask": torch.cat([rollout.prompt_mask[:, start:], completion_mask], dim=1),
            "loss_mask": completion_mask.clone(), "stopped": rollout.stopped}


def as_rollout(batch: dict[str, torch.Tensor]) -> Rollout:
    width = batch["loss_mask"].shape[1]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    return Rollout(ids[:, : ids.shape[1] - width], mask[:, : mask.shape[1] - width], ids[:, ids.shape[1] - width:],
                   mask[:, mask.shape[1] - width:], batch["stopped"])


class GRPOObjective:
    """The loss of a GRPO micro-batch (objective.Objective): forward on prompt + completion, clipped
    surrogate (+ beta x KL), normalisation. Reads input_ids, attention_mask, loss_mask, advantages,
    stopped and, with rl.beta > 0, ref_logps. KL and clipped-token counts go to `stats` (the batch
    source's window), so that they are logged with the rollouts that produced them."""

    name = "grpo"

    def __init__(self, rl: RLConfig, stats_owner: RolloutBatches | None = None):
        self.rl = rl
        self.stats_owner = stats_owner

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """What the micro-batch adds to the step's normaliser (known before the forward)."""
        rows = batch["loss_mask"].shape[0]
        if self.rl.loss_normalization == "sequence":
            return rows
        if self.rl.loss_normalization == "token":
            return int(batch["loss_mask"].sum())
        return rows * self.rl.max_completion_tokens

    def __call__(self, model: Any, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        out = self.loss(model, batch)
        if self.stats_owner is not None:
            stats = self.stats_owner.stats
            stats.kl_sum += out.kl_sum
            stats.clipped_tokens += out.clipped_tokens
            stats.loss_tokens += out.tokens
        return ObjectiveOutput(out.numerator)

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> PolicyLoss:
        rl = self.rl
        if batch["loss_mask"].shape[0] == 0:  # every group had equal rewards: nothing to learn from
            zero = torch.zeros((), requires_grad=True, device=batch["input_ids"].device)
            return PolicyLoss(zero, 0, 0.0, 0, 0)
        logps = completion_logps(model, as_rollout(batch), rl.temperature)
        mask = batch["loss_mask"].to(logps.device)
        ref = batch.get("ref_logps")
        return policy_loss(logps, logps.detach(), batch["advantages"].to(logps.device), mask,
                           epsilon_low=rl.epsilon_low, epsilon_high=rl.epsilon_high, beta=rl.beta,
                           ref_logps=ref.to(logps.device) if ref is not None else None,
                           normalization=rl.loss_normalization, max_completion_tokens=rl.max_completion_tokens)


def build_grpo(run: Any, rank: int = 0, world_size: int = 1) -> tuple[GRPOObjective, RolloutBatches]:
    """The objective and the batch source of a `train.objective: grpo` run (a setup.Run with its problems)."""
    cfg = run.cfg
    batches = RolloutBatches(run.model, run.tokenizer, run.fmt, run.train_problems, cfg.rl, cfg.train.batch_size,
                             cfg.train.seed, cfg.train.grad_accum, rank, world_size)
    return GRPOObjective(cfg.rl, batches), batches


@torch.no_grad()
def evaluate_problems(model: Any, tokenizer: Any, fmt: PromptFormat, problems: Sequence[Problem], rl: RLConfig,
                      batch_size: int = 8) -> dict[str, Any]:
    """Greedy answers to `problems`: accuracy, format rate, mean reward per component, mean length, examples."""
    rewards = build_rewards(rl)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)
    completions: list[Completion] = []
    for i in range(0, len(problems), batch_size):
        chunk = [p.question for p in problems[i: i + batch_size]]
        rollout = sample(model, prompt_token_ids(fmt, tokenizer, chunk), eos_id=eos_id(tokenizer), pad_id=pad,
                         max_new_tokens=rl.max_completion_tokens, temperature=0.0)
        completions += decode_completions(rollout, tokenizer, [fmt.prompt(q) for q in chunk])
    references = [p.reference for p in problems]
    scores = score(completions, references, [p.row for p in problems], rewards)
    n = max(1, len(problems))
    result: dict[str, Any] = {
        "accuracy": sum(answer_matches(c.answer, r, rl.numeric_tolerance) for c, r in zip(completions, references)) / n,
        "format_rate": sum(format_reward(c) == 1.0 for c in completions) / n,
        "reward": statistics.fmean(scores.total) if scores.total else 0.0,
        "completion_length": sum(c.num_tokens for c in completions) / n,
        "problems": len(problems),
    }
    result.update({f"reward/{name}": statistics.fmean(v) for name, v in scores.components.items()})
    result["examples"] = [{"question": p.question, "reference": p.reference, "thinking": c.thinking, "answer": c.answer,
                           "correct": answer_matches(c.answer, p.reference, rl.numeric_tolerance)}
                          for p, c in zip(problems[:4], completions[:4])]
    return result
