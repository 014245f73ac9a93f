"""Kill test: SIGKILL a real `thinktune train` run again and again, resume it, and check nothing is lost.

A tiny random Qwen2 model (built here, like the test fixtures) trains on the CPU through the
real CLI (`python -m thinktune train cfg.yaml ...`) with a checkpoint after every step, so
many kills land in the middle of a checkpoint write. After each SIGKILL the run continues
with `--resume latest`. A kill is "lost" when the resume fails, or resumes from an older
step than the newest checkpoint the killed process had reported as saved, or than the
newest complete checkpoint on disk. At the end the adapter must equal (torch.equal) that of
an uninterrupted run, and so must every logged loss. Last line:

    kills: 20, lost: 0, identical: yes

Usage: python scripts/kill_test.py [--kills 20] [--seed 0] [--workdir DIR] [--keep]
Not a unit test (it takes a few minutes on 2 cores); it never touches anything outside --workdir.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from conftest import build_model, build_tokenizer  # noqa: E402  (the fixtures' tiny model builders)
from thinktune.checkpoint import TMP_PREFIX, list_checkpoints  # noqa: E402

SAVED = re.compile(r"checkpoint saved: .*checkpoint-(\d+)$")
RESUMED = re.compile(r"resuming from .* \(step (\d+) of")
READY = "training path:"  # printed once the model is built, right before the loop starts
FRESH = "starting from step 0"


class Child:
    """One `thinktune train` process; its stdout lines are collected by a thread."""

    def __init__(self, cfg_path: Path, out_dir: Path, resume: bool, log_file: Path):
        cmd = [sys.executable, "-m", "thinktune", "train", str(cfg_path), f"output.output_dir={out_dir}"]
        if resume:
            cmd += ["--resume", "latest"]
        # one thread per process: the same arithmetic in every run, and the reference run can train
        # on the second core while the killed run starts up
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.resume = resume
        self.stderr = log_file.open("w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.lines: list[str] = []
        self.times: list[float] = []
        self.ready = threading.Event()
        self.saving = threading.Event()  # the first checkpoint of this process is written: steps are under way
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fresh = not self.resume
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self.times.append(time.time())
            fresh = fresh or FRESH in line
            if RESUMED.search(line) or (READY in line and fresh):  # training starts now
                self.ready.set()
            if SAVED.search(line):
                self.saving.set()
        self.ready.set()  # EOF: the process ended
        self.saving.set()

    def saved_steps(self) -> list[int]:
        return [int(m.group(1)) for line in self.lines if (m := SAVED.search(line))]

    def seconds_per_step(self) -> float | None:
        """Median time between two checkpoint lines (one step + its save), once a few were seen."""
        times = [t for line, t in zip(self.lines, self.times) if SAVED.search(line)]
        gaps = sorted(b - a for a, b in zip(times, times[1:]))
        return gaps[len(gaps) // 2] if len(gaps) >= 3 else None

    def resumed_step(self) -> int | None:
        for line in self.lines:
            if m := RESUMED.search(line):
                return int(m.group(1))
            if "starting from step 0" in line:
                return 0
        return None

    def finish(self) -> int:
        code = self.proc.wait()
        self.reader.join()
        self.stderr.close()
        return code


def write_config(work: Path, model_dir: Path, steps: int) -> Path:
    cfg = {
        "model": {"name_or_path": str(model_dir), "device": "cpu"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"path": "sample:en", "template": "seed-en", "max_seq_length": 320, "max_rows": 20, "eval_size": 4,
                 "overlong": "truncate"},  # short rows keep the kills quick; cut rows are fine here
        "train": {"batch_size": 2, "grad_accum": 2, "max_steps": steps, "lr": 1e-3, "warmup_steps": 2,
                  "optimizer": "adamw", "precision": "fp32", "gradient_checkpointing": False, "logging_steps": 1,
                  "save_steps": 1, "save_total_limit": 2, "eval_steps": 5, "seed": 7},
        "output": {"tensorboard": False},
    }
    path = work / "kill.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def build_tiny_model(work: Path) -> Path:
    folder = work / "tiny-qwen2"
    folder.mkdir()
    tokenizer = build_tokenizer(folder)
    build_model(folder, "qwen2", len(tokenizer))
    return folder


def newest_on_disk(out_dir: Path) -> int:
    found = list_checkpoints(out_dir)
    return found[-1].step if found else 0


def losses(out_dir: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("lr")) for r in rows if r["kind"] == "train"] + \
        [(r["step"], r["eval_loss"]) for r in rows if r["kind"] == "eval"]


def adapters_equal(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    left, right = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--workdir", help="default: a new temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="thinktune-kill-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    steps = 4 * args.kills + 20
    cfg_path = write_config(work, build_tiny_model(work), steps)

    # 1. the uninterrupted reference run, alongside the killed one (each uses one core)
    ref_dir, run_dir = work / "reference", work / "killed"
    ref = Child(cfg_path, ref_dir, False, work / "reference.log")
    while (per_step := ref.seconds_per_step()) is None:
        if ref.proc.poll() is not None:
            print(f"reference run failed; see {work / 'reference.log'}")
            return 1
        time.sleep(0.2)
    print(f"reference run: {per_step:.2f} s per step including its checkpoint; every 4th kill comes 0-{per_step:.2f} s "
          f"after the model is ready (restore, first step), the others 0-{2 * per_step:.2f} s after the first save")

    # 2. the killed run: start (then --resume latest), wait a random time, SIGKILL, check what is on disk
    lost, mid_save, reported, last_disk = 0, 0, 0, 0
    for kill in range(1, args.kills + 1):
        child = Child(cfg_path, run_dir, kill > 1, work / f"kill-{kill}.log")
        early = kill % 4 == 0
        (child.ready if early else child.saving).wait()
        delay = rng.uniform(0.0, per_step if early else 2.0 * per_step)
        time.sleep(delay)
        if child.proc.poll() is not None:
            child.finish()
            print(f"kill {kill}: the run ended by itself (exit {child.proc.returncode}); see {work / f'kill-{kill}.log'}")
            return 1
        child.proc.send_signal(signal.SIGKILL)
        child.finish()
        resumed = child.resumed_step() if kill > 1 else 0
        leftovers = sorted(p.name for p in run_dir.iterdir() if p.name.startswith(TMP_PREFIX))
        on_disk = newest_on_disk(run_dir)
        reported = max([reported, *child.saved_steps()])
        if resumed != last_disk or on_disk < reported:
            lost += 1
        mid_save += bool(leftovers)
        print(f"kill {kill:2d}: {delay:4.2f} s after {'start' if early else 'first save'}; resumed at step {resumed}, newest checkpoint on disk "
              f"{on_disk} (newest reported saved: {reported}){'; mid-save: ' + ', '.join(leftovers) if leftovers else ''}")
        last_disk = on_disk

    # 3. resume to the end
    final = Child(cfg_path, run_dir, True, work / "final.log")
    code = final.finish()
    if final.resumed_step() != last_disk:
        lost += 1
    if ref.finish() != 0:
        print(f"reference run failed; see {work / 'reference.log'}")
        return 1
    identical = code == 0 and adapters_equal(ref_dir, run_dir) and losses(ref_dir) == losses(run_dir)
    print(f"{mid_save} of {args.kills} kills landed while a checkpoint was being written or pruned; "
          f"{time.time() - started:.0f} s in all; work folder {work}")
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(f"kills: {args.kills}, lost: {lost}, identical: {'yes' if identical else 'no'}")
    return 0 if identical and lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
