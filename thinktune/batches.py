"""The batch source: which examples form each optimizer step's micro-batches, on every rank.

`MicroBatches` is the endless stream of micro-batches over epochs: micro-batch i of the run is a
fixed function of (seed, epoch, i), so the data position is one world-size-free count and a resumed
run continues exactly. `for_step(position)` gives this rank its micro-batches of the step that
starts at `position` (rank r takes the run's micro-batches position + r, + r + W, ...), padded as
drawn or, with packing, the same examples packed into rows of at most batch_size x max_seq_length
tokens; every rank runs the same number of forwards per step (rows without a target fill up the
ranks that packed fewer). This module never runs a model and never touches an optimizer.
"""
from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from thinktune.data import IGNORE_INDEX, Example, collate, collate_packed, epoch_batches, pack_by_tokens

Batch = dict[str, torch.Tensor]


class BatchSource(Protocol):
    """What the loop asks of a batch source (MicroBatches for SFT; rl.objective.RolloutBatches for GRPO)."""

    per_epoch: int
    """Micro-batches in one pass over the data."""

    @property
    def per_step(self) -> int:
        """Micro-batches of the run one optimizer step consumes (over all ranks)."""
        ...

    def for_step(self, position: int) -> list[Batch]:
        """This rank's micro-batches of the optimizer step that starts at micro-batch `position`."""
        ...

    def window_metrics(self) -> dict[str, Any]:
        """Figures about the micro-batches drawn since the last call, logged with the train record."""
        ...


class MicroBatches:
    """The run's micro-batches; index i is the i-th micro-batch of the run (over all ranks)."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int, pack_tokens: int = 0,
                 grad_accum: int = 1, rank: int = 0, world_size: int = 1):
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id
        self.pack_tokens = pack_tokens  # > 0: a step's examples are packed into rows of at most this many tokens
        self.grad_accum, self.rank, self.world_size = grad_accum, rank, world_size
        self.per_epoch = math.ceil(len(examples) / batch_size)
        self._epoch, self._batches = -1, []  # type: ignore[var-annotated]

    @property
    def per_step(self) -> int:
        """Micro-batches of the run one optimizer step consumes (over all ranks)."""
        return self.grad_accum * self.world_size

    def indices(self, index: int) -> list[int]:
        epoch = index // self.per_epoch
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(len(self.examples), self.batch_size, self.seed, epoch)
        return self._batches[index % self.per_epoch]

    def batch(self, index: int) -> Batch:
        return collate([self.examples[i] for i in self.indices(index)], self.pad_id)

    def rank_indices(self, position: int, rank: int) -> list[int]:
        """The run's micro-batch indices `rank` takes in the step starting at `position`."""
        return [position + rank + i * self.world_size for i in range(self.grad_accum)]

    def for_step(self, position: int) -> list[Batch]:
        """This rank's micro-batches of the optimizer step that starts at micro-batch `position`.

        Every rank gets the same number: packing can turn the same number of examples into more
        rows on one rank than on another (long and short documents), and FSDP2 gathers parameters
        on every forward, so unequal counts would leave collectives waiting for ever. Each rank
        packs every rank's examples of the step (a pure function of the position: no
        communication), and the ranks with fewer rows run `padding_row`s, which have no target
        and add nothing to the loss or the gradients.
        """
        batches = self.step(self.rank_indices(position, self.rank))
        if self.pack_tokens and self.world_size > 1:
            most = max(self.packed_rows(self.rank_indices(position, rank)) for rank in range(self.world_size))
            batches += [self.padding_row() for _ in range(most - len(batches))]
        return batches

    def packed_rows(self, indices: list[int]) -> int:
        """How many packed rows the examples of these micro-batches make."""
        return len(pack_by_tokens([self.examples[j] for i in indices for j in self.indices(i)], self.pack_tokens))

    def padding_row(self) -> Batch:
        """A packed row of two pad tokens without a target: a forward and backward that change nothing."""
        return collate_packed([Example([self.pad_id, self.pad_id], [IGNORE_INDEX, IGNORE_INDEX])], self.pad_id)

    def window_metrics(self) -> dict[str, Any]:
        """Nothing beyond what the loop logs already (the SFT batches are fixed data)."""
        return {}

    def step(self, indices: list[int]) -> list[Batch]:
        """One optimizer step's micro-batches: padded as drawn, or (packing) the same examples packed."""
        if not self.pack_tokens:
            return [self.batch(i) for i in indices]
        examples = [self.examples[j] for i in indices for j in self.indices(i)]
        return [collate_packed(group, self.pad_id) for group in pack_by_tokens(examples, self.pack_tokens)]
