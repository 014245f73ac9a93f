"""Checkpoints: atomic writes, discovery, pruning, and the output_dir's ownership.

A checkpoint folder `checkpoint-N/` holds the PEFT adapter (`adapter_config.json`,
`adapter_model.safetensors`, loadable as-is by `PeftModel.from_pretrained`), the
tokenizer, `trainer_state.pt` (optimizer, RNG states, data position; tensors and
plain values only, read back with `torch.load(weights_only=True)`), `config.json`
(the run's config) and last `thinktune_checkpoint.json`. It is written into
`.tmp-checkpoint-N-<pid>/`, every file fsynced, then renamed into place: a checkpoint
is complete or absent. This module knows nothing of the training loop's arithmetic.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from thinktune.errors import UserError

MARKER = "thinktune_checkpoint.json"
RUN_FILE = "thinktune_run.json"
CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-"
OWNED = ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "tensorboard", "config.json",
         "trainer_state.pt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
         "summary.json", "plots", "eval.json", "report.html", "report.md", RUN_FILE)


@dataclass
class CheckpointInfo:
    path: Path
    step: int


def fsync_tree(folder: Path) -> None:
    """Flush every file under folder, then the folders themselves."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(root))


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_checkpoint(output_dir: Path, step: int, write_files: Callable[[Path], None], meta: dict[str, Any]) -> Path:
    """Call write_files(tmp_folder), add the completion marker, fsync, and rename into checkpoint-{step}."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"{TMP_PREFIX}checkpoint-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_files(tmp)
    (tmp / MARKER).write_text(json.dumps({"step": step, "time": time.time(), **meta}, indent=2), encoding="utf-8")
    fsync_tree(tmp)
    if final.exists():  # re-saving the same step after a resume: swap atomically, old copy last to go
        trash = output_dir / f"{TMP_PREFIX}trash-{final.name}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(output_dir)
    return final


def list_checkpoints(output_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints, oldest first."""
    found = []
    if output_dir.is_dir():
        for child in output_dir.iterdir():
            match = CKPT_RE.match(child.name)
            if match and (child / MARKER).is_file():
                found.append(CheckpointInfo(child, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def clean_leftovers(output_dir: Path) -> list[str]:
    """Remove folders of interrupted saves; return their names (for a one-line notice)."""
    removed = []
    if output_dir.is_dir():
        for child in output_dir.iterdir():
            incomplete = CKPT_RE.match(child.name) and child.is_dir() and not (child / MARKER).is_file()
            if child.name.startswith(TMP_PREFIX) or incomplete:
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
                removed.append(child.name)
    return sorted(removed)


def find_resume_checkpoint(output_dir: Path, resume: str) -> CheckpointInfo:
    """'latest' -> newest complete checkpoint in output_dir; otherwise a checkpoint folder path."""
    if resume == "latest":
        leftovers = clean_leftovers(output_dir)
        if leftovers:
            print(f"notice: removed {len(leftovers)} leftover(s) of an interrupted save: {', '.join(leftovers)}", flush=True)
        found = list_checkpoints(output_dir)
        if not found:
            raise UserError(f"--resume latest: no complete checkpoint in {output_dir}; start without --resume")
        return found[-1]
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise UserError(f"--resume {resume}: no such checkpoint folder")
    if not (path / MARKER).is_file() or not (path / "trainer_state.pt").is_file():
        raise UserError(f"--resume {resume}: not a complete thinktune checkpoint (no {MARKER}/trainer_state.pt)")
    match = CKPT_RE.match(path.name)
    return CheckpointInfo(path, int(match.group(1)) if match else json.loads((path / MARKER).read_text())["step"])


def prune_checkpoints(output_dir: Path, keep: int | None, protect: set[Path] | None = None) -> None:
    """Delete the oldest checkpoints beyond `keep`; the newest (the one a resume needs) and `protect` stay."""
    if not keep:
        return
    found = list_checkpoints(output_dir)
    protect = {p.resolve() for p in (protect or set())}
    for info in found[:-keep]:
        if info.path.resolve() in protect:
            continue
        trash = output_dir / f"{TMP_PREFIX}trash-{info.path.name}-{os.getpid()}"
        os.replace(info.path, trash)  # a kill mid-delete leaves a .tmp- folder, never a half checkpoint
        shutil.rmtree(trash, ignore_errors=True)


def load_trainer_state(folder: Path) -> dict[str, Any]:
    try:
        return torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{folder}/trainer_state.pt is unreadable ({type(exc).__name__}); resume from an older checkpoint") from None


def check_output_dir(output_dir: Path, overwrite: bool) -> list[str]:
    """Refuse to start a new run over another run's files unless overwrite; return what overwrite would remove."""
    if not output_dir.exists():
        return []
    if not output_dir.is_dir():
        raise UserError(f"output_dir {output_dir} is a file, not a folder")
    ours = [p.name for p in output_dir.iterdir() if p.name in OWNED or CKPT_RE.match(p.name)]
    others = [p.name for p in output_dir.iterdir() if p.name not in ours and not p.name.startswith(TMP_PREFIX)]
    if ours and not overwrite:
        raise UserError(
            f"output_dir {output_dir} holds another run ({', '.join(sorted(ours)[:4])}...): continue it with "
            f"--resume latest, choose another output.output_dir, or set output.overwrite=true to replace it"
        )
    if others and not ours:
        raise UserError(
            f"output_dir {output_dir} is not empty and holds files thinktune did not write ({', '.join(sorted(others)[:3])}); "
            f"choose an empty or new folder"
        )
    return ours


def claim_output_dir(output_dir: Path, run_id: str, overwrite: bool) -> None:
    """Check, then (overwrite=true) remove only what an earlier thinktune run wrote, and mark the folder as ours."""
    ours = check_output_dir(output_dir, overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in ours:
        target = output_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    clean_leftovers(output_dir)
    atomic_write_text(output_dir / RUN_FILE, json.dumps({"run_id": run_id, "started": time.time()}))
