"""Objectives: what one micro-batch's loss is. SFT's causal-LM loss lives here; others sit beside it.

An objective is the one thing `step.TrainStep` asks about the loss. It owns the maths of the loss
and nothing else: it never steps an optimizer, never scales for accumulation or data parallelism,
never moves tensors between devices and never chooses data. The contract (`Objective`):

- `count(batch) -> int`: the micro-batch's normalising count (SFT: target tokens; an RL objective:
  completion tokens, or sequences), read from host tensors BEFORE any forward. The step sums it
  over the optimizer step's micro-batches and, through the data-parallel object, over all ranks;
  that global sum is the denominator of every micro-batch's loss, so gradient accumulation and
  N processes give exactly the update of one big batch.
- `__call__(model, batch) -> ObjectiveOutput(loss, metrics)`: `loss` is a scalar tensor, the SUM of
  the per-unit losses of this micro-batch (not a mean: the step divides by the global count);
  `metrics` maps names to scalar tensors that are likewise sums over the micro-batch (the step adds
  them over micro-batches, detached, and logs them divided by the same count; `{}` is fine).
  `model` is the PEFT-wrapped causal LM (or, under DDP/FSDP2, the module the data-parallel object
  wrapped around the objective's call: the objective never sees the wrapper).
- `name`: the value of `train.objective` that selects it.

Where batches come from: the loop asks its batch source (`batches.MicroBatches` for SFT: padded or
packed rows of `data.Example`s, each a dict of CPU tensors) for one optimizer step's micro-batches
and hands them to the step, which calls `count` on each, then moves each to the device and calls
the objective under autocast. A batch is a `dict[str, torch.Tensor]`; an objective documents the
keys it reads (SFT: input_ids, labels, attention_mask | position_ids + seq_lens). An RL objective
brings its own batch source (rollouts with their rewards/advantages as tensors in the same dict).

Selecting an objective: `train.objective` in the config (`sft` by default). `build_objective` maps
the name to the objective's constructor; a second objective is one new module plus one entry in
`OBJECTIVES` and one value in `TrainConfig.objective`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from thinktune.data import IGNORE_INDEX, Example, collate
from thinktune.kernels import fused_linear_cross_entropy
from thinktune.model import causal_lm_parts

Batch = dict[str, torch.Tensor]


@dataclass
class ObjectiveOutput:
    """One micro-batch's summed loss (a scalar tensor with a graph) and summed metrics (scalar tensors)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class Objective(Protocol):
    """The loss of a micro-batch; see the module docstring for the contract."""

    name: str

    def count(self, batch: Batch) -> int:
        """The micro-batch's normalising count, from host tensors (no device sync)."""
        ...

    def __call__(self, model: Any, batch: Batch) -> ObjectiveOutput:
        """Summed loss and summed metrics of the micro-batch."""
        ...


# ----------------------------------------------------------------------------- SFT: the causal-LM loss

def fused_loss_applies(model: Any, fast: Any = None) -> tuple[bool, str]:
    """Whether the fused linear cross-entropy computes the same loss as the model's own head, and why.

    With `fast` (the `fastpath.FastPath` that setup applied), the reason also lists the fused
    modules and the memory plan.
    """
    fused, why = _fused_loss_reason(model)
    if fast is not None:
        return fused, f"{why}; {fast.describe()}" if fused else f"{why}; still {fast.describe()}"
    return fused, why


def _fused_loss_reason(model: Any) -> tuple[bool, str]:
    try:
        decoder, head = causal_lm_parts(model)
    except (AttributeError, NotImplementedError):
        return False, "the model exposes no decoder/lm_head"
    if decoder is None or not isinstance(head, torch.nn.Linear) or type(head) is not torch.nn.Linear:
        return False, "the LM head is adapted or not a plain Linear"
    if head.bias is not None:
        return False, "the LM head has a bias"
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False, "the model scales or soft-caps its logits"
    return True, f"fused linear cross-entropy: the {head.out_features:,}-vocab logits are never materialised"


def target_tokens(batch: Batch) -> int:
    """Next-token targets of a labelled batch (labels shifted by one; IGNORE_INDEX is no target)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class CausalLMObjective:
    """SFT: the sum of next-token cross-entropies over the batch's target tokens.

    Reads input_ids, labels and attention_mask (padded rows) or position_ids + seq_lens (a packed
    row, data.collate_packed: the lengths reach the attention as `document_lengths`, the fast
    path's per-document attention; transformers' own attention finds the documents from the
    restarting position_ids). With `fused=True` the LM head and the cross-entropy run chunked
    (kernels.fused_linear_cross_entropy) and the full logits never exist; otherwise the model's
    own logits go through a float32 cross-entropy.
    """

    name = "sft"

    def __init__(self, fused: bool, loss_kernel: str = "chunked"):
        self.fused = fused
        self.loss_kernel = loss_kernel
        """`kernels.fused_linear_cross_entropy`'s impl: "chunked" or "liger"."""

    def count(self, batch: Batch) -> int:
        return target_tokens(batch)

    def __call__(self, model: Any, batch: Batch) -> ObjectiveOutput:
        return ObjectiveOutput(self.loss(model, **batch))

    def loss(self, model: Any, input_ids: torch.Tensor, labels: torch.Tensor,
             attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
             seq_lens: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        targets = labels[:, 1:].reshape(-1)
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                  "position_ids": position_ids, "use_cache": False}
        if seq_lens is not None:  # a host tensor: compiled layers then see one dynamic shape, not the lengths
            inputs["document_lengths"] = seq_lens.cpu()
        if self.fused:
            decoder, head = causal_lm_parts(model)
            hidden = decoder(**inputs).last_hidden_state[:, :-1]
            return fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, targets,
                                              ignore_index=IGNORE_INDEX, reduction="sum", impl=self.loss_kernel)
        logits = model(**inputs).logits[:, :-1]
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets,
                               ignore_index=IGNORE_INDEX, reduction="sum")


class ObjectiveModule(torch.nn.Module):
    """The model and an objective as one module: what a data-parallel wrapper (DDP) wraps.

    forward(**batch) -> (summed loss, metrics), optionally under a saved-tensor context
    (`saved_tensors`: e.g. offload.PinnedOffload, which parks checkpoints in host memory).
    """

    def __init__(self, model: Any, objective: Objective,
                 saved_tensors: Callable[[], contextlib.AbstractContextManager] | None = None):
        super().__init__()
        self.model = model
        self.objective = objective
        self.saved_tensors = saved_tensors

    def forward(self, **batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with self.saved_tensors() if self.saved_tensors is not None else contextlib.nullcontext():
            out = self.objective(self.model, batch)
        return out.loss, out.metrics


# ----------------------------------------------------------------------------- selection

OBJECTIVES: dict[str, Callable[..., Objective]] = {"sft": CausalLMObjective}
"""train.objective -> the objective's constructor (called with `fused=`: whether the fused LM head applies)."""


def build_objective(name: str, fused: bool, loss_kernel: str = "chunked") -> Objective:
    """The objective `train.objective` names; `fused`: the fused linear cross-entropy may be used,
    `loss_kernel` which one (setup.pick_loss_kernel)."""
    if name == "sft":
        return CausalLMObjective(fused=fused, loss_kernel=loss_kernel)
    return OBJECTIVES[name](fused=fused)


# ----------------------------------------------------------------------------- held-out loss

@torch.no_grad()
def heldout_loss(model: Any, examples: list[Example], batch_size: int, pad_id: int, device: torch.device,
                 amp_dtype: torch.dtype | None = None) -> tuple[float, int]:
    """Mean next-token loss over the examples' target tokens, and the token count (model in eval mode)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i: i + batch_size], pad_id).items()}
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        labels = batch["labels"][:, 1:]
        total += float(F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction="sum"))
        tokens += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(1, tokens), tokens
