"""Checkpoints: atomic writes, discovery, pruning, and the output_dir's ownership.

A checkpoint folder `checkpoint-N/` holds the PEFT adapter (`adapter_config.json`,
`adapter_model.safetensors`, loadable as-is by `PeftModel.from_pretrained`), the
tokenizer, `trainer_state.pt` (optimizer, RNG states, data position; tensors and
plain values only, read back with `torch.load(weights_only=True)`),
`thinktune_config.json` (the run's config; runs before it was renamed wrote
`config.json`, which is still read) and last `thinktune_checkpoint.json`. It is written into
`.tmp-checkpoint-N-<pid>/`, every file fsynced, the marker written and fsynced last,
then renamed into place: a checkpoint is complete or absent. Anything under the
`.tmp-` prefix is a leftover of an interrupted save or delete, and `--resume latest`
cleans it up. Pruning (`save_total_limit`) never deletes the newest checkpoint.
`output.overwrite=true` deletes only what `thinktune_run.json` says thinktune wrote;
a folder without that marker is not a run, and nothing in it is ever deleted.
This module knows nothing of the training loop's arithmetic.
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
from thinktune.load_errors import torch_load_failure

MARKER = "thinktune_checkpoint.json"
RUN_FILE = "thinktune_run.json"
CONFIG_FILE = "thinktune_config.json"
LEGACY_CONFIG_FILE = "config.json"  # runs before the rename; never written, read only when it is a run config
CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-"
OLD_PREFIX = f"{TMP_PREFIX}old-"
OLD_RE = re.compile(r"^\.tmp-old-(checkpoint-\d+)-\d+$")
CHECKPOINTS = "checkpoint-N"  # the entry of a marker's "writes" that stands for every checkpoint-<step> folder
OWNED = ("adapter_config.json", "adapter_model.safetensors", "README.md", "metrics.jsonl", "tensorboard", CONFIG_FILE,
         "trainer_state.pt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
         "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
         "summary.json", "plots", "eval.json", "report.html", "report.md", RUN_FILE, CHECKPOINTS)
"""What thinktune writes into an output_dir; a run's marker records this list when the run starts."""
LEGACY_OWNED = OWNED + (LEGACY_CONFIG_FILE,)
"""For a marker written before markers listed their files (it holds only run_id and started): what those
runs wrote, and what a newer thinktune adds when it resumes them."""


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
    """Call write_files(tmp_folder), add the completion marker last, fsync, and rename into checkpoint-{step}.

    Re-saving a step that already has a checkpoint first renames the old copy to
    `.tmp-old-checkpoint-N-<pid>`; a kill between the two renames leaves that complete
    old copy, which `clean_leftovers` puts back.
    """
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"{TMP_PREFIX}checkpoint-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_files(tmp)
    fsync_tree(tmp)
    marker = {"step": step, "time": time.time(), "torch": torch.__version__, **meta}
    with open(tmp / MARKER, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(marker, indent=2))
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(tmp)
    if final.exists():
        old = output_dir / f"{OLD_PREFIX}{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(output_dir)
        shutil.rmtree(old, ignore_errors=True)
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
    """Remove what interrupted saves left behind; return their names (for a one-line notice).

    A complete old copy of a checkpoint that was being replaced (`.tmp-old-checkpoint-N-*`)
    is renamed back when checkpoint-N is missing; everything else under the `.tmp-`
    prefix, and any checkpoint-N without its marker, is deleted.
    """
    removed = []
    if not output_dir.is_dir():
        return removed
    for child in sorted(output_dir.iterdir()):
        old = OLD_RE.match(child.name)
        if old and (child / MARKER).is_file() and not (output_dir / old.group(1)).exists():
            os.replace(child, output_dir / old.group(1))
            fsync_dir(output_dir)
            continue
        incomplete = CKPT_RE.match(child.name) and child.is_dir() and not (child / MARKER).is_file()
        if child.name.startswith(TMP_PREFIX) or incomplete:
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed.append(child.name)
    return removed


def can_start_over(output_dir: Path) -> bool:
    """True when output_dir holds no finished work: no checkpoint and no final adapter (a run killed early)."""
    if not output_dir.exists():
        return True
    if not output_dir.is_dir():
        return False
    names = {p.name for p in output_dir.iterdir() if not p.name.startswith(TMP_PREFIX)}
    partial = {RUN_FILE, "metrics.jsonl", "tensorboard", "metrics.tmp"}
    return not list_checkpoints(output_dir) and names <= partial


def find_resume_checkpoint(output_dir: Path, resume: str, log: Callable[[str], None] = print) -> CheckpointInfo | None:
    """'latest' -> newest complete checkpoint in output_dir (None: nothing to resume yet, start at step 0);
    otherwise the checkpoint folder at path `resume`."""
    if resume == "latest":
        leftovers = clean_leftovers(output_dir)
        if leftovers:
            log(f"notice: removed {len(leftovers)} leftover(s) of an interrupted save: {', '.join(leftovers)}")
        found = list_checkpoints(output_dir)
        if found:
            return found[-1]
        if can_start_over(output_dir):
            log(f"notice: --resume latest: no checkpoint in {output_dir} yet; starting from step 0")
            return None
        raise UserError(f"--resume latest: {output_dir} holds no complete checkpoint to resume (only finished or "
                        f"foreign files); start without --resume in a new output.output_dir")
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise UserError(f"--resume {resume}: no such checkpoint folder")
    if not (path / MARKER).is_file() or not (path / "trainer_state.pt").is_file():
        inside = list_checkpoints(path)
        hint = f"; it holds checkpoints: use --resume {inside[-1].path} (or --resume latest)" if inside else ""
        raise UserError(f"--resume {resume}: not a complete thinktune checkpoint (no {MARKER} or trainer_state.pt){hint}")
    match = CKPT_RE.match(path.name)
    try:
        step = int(match.group(1)) if match else int(json.loads((path / MARKER).read_text(encoding="utf-8"))["step"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"--resume {resume}: {MARKER} is unreadable; not a checkpoint thinktune wrote") from None
    return CheckpointInfo(path, step)


def set_aside_newer(output_dir: Path, step: int) -> Path | None:
    """Move checkpoints newer than `step` (another timeline, when resuming from an older one) into
    output_dir/superseded-<time>/, so `--resume latest` and pruning only ever see this run's line."""
    newer = [c for c in list_checkpoints(output_dir) if c.step > step]
    if not newer:
        return None
    folder = output_dir / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(exist_ok=True)
    for info in newer:
        os.replace(info.path, folder / info.path.name)
    fsync_dir(output_dir)
    return folder


def prune_checkpoints(output_dir: Path, keep: int | None, protect: set[Path] | None = None) -> list[Path]:
    """Delete the oldest checkpoints beyond `keep`; the newest (the one a resume needs) and `protect` stay."""
    if not keep:
        return []
    found = list_checkpoints(output_dir)
    protect = {p.resolve() for p in (protect or set())}
    deleted = []
    for info in found[:-keep]:  # keep >= 1, so the newest complete checkpoint is never in this slice
        if info.path.resolve() in protect:
            continue
        trash = output_dir / f"{TMP_PREFIX}trash-{info.path.name}-{os.getpid()}"
        os.replace(info.path, trash)  # a kill mid-delete leaves a .tmp- folder, never a half checkpoint
        shutil.rmtree(trash, ignore_errors=True)
        deleted.append(info.path)
    return deleted


def load_trainer_state(folder: Path) -> dict[str, Any]:
    """The trainer state (tensors and plain values only: `weights_only=True` never runs pickled code)."""
    path = folder / "trainer_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types; torch_load_failure says which case this is
        raise UserError(f"{torch_load_failure(exc, path, _written_with(folder))}; resume from another checkpoint") from None


def _written_with(folder: Path) -> str | None:
    """The torch version recorded in the checkpoint's marker (None: not recorded or unreadable)."""
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8")).get("torch")
    except (OSError, ValueError, AttributeError):
        return None


def check_safetensors(weights: Path, advice: str) -> None:
    """Open a safetensors file and touch every tensor's header; a corrupt or truncated file is a UserError."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as fh:
            for key in fh.keys():
                fh.get_slice(key)
    except Exception as exc:
        raise UserError(f"{weights} is corrupt or truncated ({type(exc).__name__}); {advice}") from None


def check_checkpoint_files(folder: Path) -> None:
    """Read the adapter's safetensors header and the trainer state before anything is loaded or written."""
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{folder}: no adapter_model.safetensors; resume from another checkpoint")
    check_safetensors(weights, "resume from another checkpoint")
    load_trainer_state(folder)


def write_run_config(folder: Path, config: dict[str, Any]) -> None:
    """Save the run's config (`RunConfig.to_dict()`) as thinktune_config.json in folder."""
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")


def read_run_config(folder: Path) -> dict[str, Any] | None:
    """The run config saved in folder (a checkpoint or output_dir), or None.

    Reads thinktune_config.json, else an older run's config.json, but only when that file is a
    thinktune run config (model/data/train sections) and not a transformers model config.
    """
    for name in (CONFIG_FILE, LEGACY_CONFIG_FILE):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{path} is not valid JSON; restore it or pass the settings explicitly") from None
        if isinstance(data, dict) and {"model", "data", "train"} <= set(data) and "model_type" not in data:
            return data
    return None


def owned_names(output_dir: Path) -> list[str]:
    """Names in output_dir that its thinktune_run.json says thinktune wrote; [] without a marker."""
    marker = output_dir / RUN_FILE
    if not marker.is_file():
        return []
    try:
        written = json.loads(marker.read_text(encoding="utf-8")).get("writes", LEGACY_OWNED)
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise UserError(f"{marker} is unreadable, so thinktune cannot tell which files it wrote there; "
                        f"choose another output.output_dir") from None
    return [p.name for p in output_dir.iterdir()
            if p.name in written or (CHECKPOINTS in written and CKPT_RE.match(p.name))]


def check_output_dir(output_dir: Path, overwrite: bool) -> list[str]:
    """Refuse to start a new run over another run's files unless overwrite; return what overwrite would remove."""
    if not output_dir.exists():
        return []
    if not output_dir.is_dir():
        raise UserError(f"output_dir {output_dir} is a file, not a folder")
    ours = owned_names(output_dir)
    others = [p.name for p in output_dir.iterdir() if p.name not in ours and not p.name.startswith(TMP_PREFIX)]
    if ours and not overwrite and can_start_over(output_dir):
        raise UserError(
            f"output_dir {output_dir} holds a run stopped before its first checkpoint: start it again with "
            f"--resume latest (from step 0), or replace it with --overwrite (output.overwrite=true)"
        )
    if ours and not overwrite:
        raise UserError(
            f"output_dir {output_dir} holds another run ({', '.join(sorted(ours)[:4])}...): continue it with "
            f"--resume latest, choose another output.output_dir, or replace it with --overwrite (output.overwrite=true)"
        )
    if others and not ours:
        raise UserError(
            f"output_dir {output_dir} is not empty and holds files thinktune did not write ({', '.join(sorted(others)[:3])}; "
            f"no {RUN_FILE}, so it is not a thinktune run and nothing there is deleted, even with output.overwrite=true); "
            f"choose an empty or new folder"
        )
    return ours


def claim_output_dir(output_dir: Path, run_id: str, overwrite: bool) -> None:
    """Check, then (overwrite=true) remove only what an earlier thinktune run wrote, and mark the folder as ours."""
    ours = check_output_dir(output_dir, overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in ours:
        if name == RUN_FILE:  # replaced last, atomically: a kill mid-way leaves the old list covering what is left
            continue
        target = output_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    clean_leftovers(output_dir)
    atomic_write_text(output_dir / RUN_FILE, json.dumps({"run_id": run_id, "started": time.time(), "writes": list(OWNED)}))
