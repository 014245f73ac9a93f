"""Metrics: one JSON object per line in output_dir/metrics.jsonl, mirrored to TensorBoard.

Records carry a "kind": "train" (every logging step), "eval", or "summary". The
plotter and the report read the file back with `read_metrics`. On resume the file is
cut back to the checkpoint's step so the log after a resume matches an uninterrupted run.
`spike_summary` words the grad-norm spike record for the loop's last line and the plots.
This module never computes a metric from a model; it stores and reads what the loop hands it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
    return records


class MetricsWriter:
    def __init__(self, output_dir: Path, tensorboard: bool, enabled: bool = True):
        self.path = output_dir / METRICS_FILE
        self.enabled = enabled
        self._tb: Any = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(output_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Keep only records up to `step` (used when resuming from checkpoint-step)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path.parent) if r.get("step", 0) <= step and r.get("kind") != "summary"]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        if self._tb is not None:
            kind = record.get("kind", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "kind"):
                    self._tb.add_scalar(f"{kind}/{key}", value, record.get("step", 0))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


SPIKE_WINDOW = 50
"""Steps in the rolling median that a grad-norm spike is measured against."""


def spike_summary(spikes: list[int], clip: float, factor: float) -> str:
    """One line on the run's grad-norm spikes and whether clipping bounded them."""
    if not spikes:
        return f"grad-norm spikes: none (rule: > {factor:g}x the rolling median of the last {SPIKE_WINDOW} steps)"
    where = ", ".join(map(str, spikes[:10])) + (" ..." if len(spikes) > 10 else "")
    clipping = f"clipping at {clip:g} was on, so each spike's update was bounded" if clip > 0 else \
        "clipping was OFF (train.max_grad_norm=0): spikes went into the update unbounded"
    return f"grad-norm spikes: {len(spikes)} at step(s) {where} (> {factor:g}x rolling median); {clipping}"
