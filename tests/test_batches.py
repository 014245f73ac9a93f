"""The batch source: the same micro-batches as drawn, and the same number of forwards on every rank."""
from __future__ import annotations

import torch

from thinktune.batches import MicroBatches
from thinktune.data import IGNORE_INDEX, Example


def examples(lengths: list[int]) -> list[Example]:
    return [Example(list(range(3, 3 + n)), [IGNORE_INDEX] + list(range(4, 3 + n))) for n in lengths]


def test_ranks_of_a_packed_step_run_the_same_number_of_forwards():
    rows = examples([200, 10, 190, 12, 180, 8, 15, 9, 210, 11, 14, 13, 195, 7, 16, 10])
    sources = [MicroBatches(rows, 2, seed=5, pad_id=0, pack_tokens=220, grad_accum=2, rank=r, world_size=2)
               for r in (0, 1)]
    unequal = 0
    for position in range(0, 32, 4):
        steps = [source.for_step(position) for source in sources]
        assert len(steps[0]) == len(steps[1])
        real = [[b for b in step if int((b["labels"] != IGNORE_INDEX).sum())] for step in steps]
        unequal += len(real[0]) != len(real[1])
        # every example of the step is in exactly one real row of one rank; the padding rows have no target
        got = sorted(int(n) for step in real for b in step for n in b["seq_lens"])
        want = sorted(len(rows[j].input_ids) for r in (0, 1) for i in sources[r].rank_indices(position, r)
                      for j in sources[r].indices(i))
        assert got == want
    assert unequal  # the lengths do make the ranks pack different numbers of rows


def test_one_process_and_unpacked_steps_are_not_padded():
    rows = examples([200, 10, 190, 12, 180, 8, 15, 9])
    single = MicroBatches(rows, 2, seed=5, pad_id=0, pack_tokens=220, grad_accum=4)
    assert all(int((b["labels"] != IGNORE_INDEX).sum()) for b in single.for_step(0))
    padded = MicroBatches(rows, 2, seed=5, pad_id=0, grad_accum=2, rank=1, world_size=2)
    step = padded.for_step(4)
    assert len(step) == 2 and torch.equal(step[0]["input_ids"], padded.batch(5)["input_ids"])
