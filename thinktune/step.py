"""The optimizer step: forward, backward, clip and update over one step's micro-batches.

`TrainStep(objective, optimizer, dp, model, ...)` is built from its parts and calls them; nothing
is assigned onto it from outside. What it calls:

- the objective (objective.Objective): the normalising count of each micro-batch (before any
  forward) and its summed loss;
- the data-parallel object (`DataParallel`; `SingleProcess` for one process,
  distributed.Parallel under torchrun): `count_tokens` sums the step's count over the ranks,
  `wrap` puts the wrapper (DDP) around the model + objective module, `no_sync` says whether a
  micro-batch's backward reduces gradients, and `loss_multiplier` undoes the wrapper's gradient
  averaging (so the update is the sum over the global batch divided by its global count);
- the optimizer, with the learning rate the loop passes in.

The loss of a step is the sum of the objective's losses over the step's micro-batches divided by
the step's global count, so accumulation and N processes equal one big batch. A step whose loss or
grad norm is not finite updates nothing. `grad_norm` is the norm before clipping. This module
never chooses data, never writes files and never decides the learning rate.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Protocol

import torch

from thinktune.objective import Batch, Objective, ObjectiveModule


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    target_tokens: int
    real_tokens: int
    skipped: bool
    metrics: dict[str, float] = field(default_factory=dict)
    """The objective's metrics over the step, each divided by the step's global count (this rank's share)."""


class DataParallel(Protocol):
    """What the step asks of data parallelism (implemented by `SingleProcess` and distributed.Parallel)."""

    @property
    def loss_multiplier(self) -> float:
        """Factor on each micro-batch's loss before backward (world size: the wrappers average gradients)."""
        ...

    def count_tokens(self, local: int) -> int:
        """The step's normalising count over all processes."""
        ...

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The module the forward goes through (DDP-wrapped, or the module itself)."""
        ...

    def no_sync(self, module: torch.nn.Module, is_last: bool) -> ContextManager[Any]:
        """Context for one micro-batch's forward + backward: gradients are reduced only on the last."""
        ...


class SingleProcess:
    """One process: no wrapping, no gradient sync, the local count is the global count."""

    loss_multiplier = 1.0

    def count_tokens(self, local: int) -> int:
        return local

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        return module

    def no_sync(self, module: torch.nn.Module, is_last: bool) -> ContextManager[Any]:
        return contextlib.nullcontext()


class TrainStep:
    """One optimizer step over a list of micro-batches (see the module docstring)."""

    def __init__(self, objective: Objective, optimizer: torch.optim.Optimizer, dp: DataParallel, model: Any,
                 device: torch.device, amp_dtype: torch.dtype | None, max_grad_norm: float,
                 saved_tensors: Callable[[], contextlib.AbstractContextManager] | None = None):
        """saved_tensors: a context for every forward (e.g. offload.PinnedOffload on the lean fast path)."""
        self.objective = objective
        self.optimizer = optimizer
        self.dp = dp
        self.model = model
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.device = device
        self.amp_dtype = amp_dtype
        self.max_grad_norm = max_grad_norm
        self.forward = dp.wrap(ObjectiveModule(model, objective, saved_tensors), device)
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    def __call__(self, micro_batches: list[Batch], lr: float) -> StepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        local_count = sum(self.objective.count(b) for b in micro_batches)
        target_tokens = self.dp.count_tokens(local_count)
        denom = max(1, target_tokens)
        multiplier = self.dp.loss_multiplier
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        real_tokens = 0
        metric_sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            # counted on the host copy: reading a device tensor here would sync the GPU every micro-batch
            real_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            # seq_lens stay on the host: the per-document attention reads them without a device sync
            batch = {k: v if k == "seq_lens" else v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self.dp.no_sync(self.forward, i == len(micro_batches) - 1):
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    summed, metrics = self.forward(**batch)
                    loss = summed / denom
                total += loss.detach()
                for name, value in metrics.items():
                    metric_sums[name] = metric_sums.get(name, 0.0) + value.detach().float() / denom
                scaled = loss * multiplier
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        loss_value = float(total)
        skipped = not (math.isfinite(loss_value) and math.isfinite(grad_norm))
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips by itself on inf; we still count it below
            self.scaler.update()
        elif not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_value, grad_norm, target_tokens, real_tokens, skipped,
                          {name: float(value) for name, value in metric_sums.items()})
