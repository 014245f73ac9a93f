"""Resume, stop and bad numbers on tiny models (CPU): bit-exact continuation, SIGTERM, NaN/Inf, spikes, OOM.

Faults are injected with test-only forward/gradient hooks on the model, installed by
wrapping `thinktune.loop.prepare` for the duration of one test; no library code is patched.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_config
from thinktune import checkpoint as ckpt
from thinktune import loop
from thinktune.cli import main
from thinktune.loop import train
from thinktune.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


def config(model_dir: Path, out: Path, **train_opts: Any):
    """6 training rows (3 micro-batches of 2 per epoch, so steps straddle epochs), 2 eval rows, dropout on."""
    opts = {"max_steps": 8, "grad_accum": 2, "save_steps": 3, "eval_steps": 4, "logging_steps": 1, **train_opts}
    return tiny_config(model_dir, out, lora={"dropout": 0.1},
                       data={"max_rows": 8, "eval_size": 2, "max_seq_length": 320}, train=opts)


def on_forward(monkeypatch, hook: Callable[[int, Any, Any], Any]) -> None:
    """Call hook(i, run, output) on the i-th training forward of the input embeddings (0-based)."""
    real = loop.prepare

    def prepare(cfg, log=print):
        run = real(cfg, log)
        calls = {"n": 0}

        def forward_hook(module, args, output):
            if not torch.is_grad_enabled():  # evaluation
                return None
            i, calls["n"] = calls["n"], calls["n"] + 1
            return hook(i, run, output)

        run.model.get_base_model().get_input_embeddings().register_forward_hook(forward_hook)
        return run

    monkeypatch.setattr(loop, "prepare", prepare)


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def logged(out: Path) -> list[tuple]:
    keys = ("kind", "step", "epoch", "loss", "grad_norm", "lr", "spike", "skipped", "eval_loss", "best")
    return [tuple(r.get(k) for k in keys) for r in read_metrics(out) if r["kind"] != "summary"]


def assert_same_run(a: Path, b: Path) -> None:
    left, right = adapter(a), adapter(b)
    assert left.keys() == right.keys()
    assert all(torch.equal(left[k], right[k]) for k in left), "adapter tensors differ"
    assert logged(a) == logged(b)


def quiet(_: str) -> None:
    pass


def test_resume_is_bit_exact(tiny_qwen2: Path, tmp_path: Path, monkeypatch):
    straight = tmp_path / "straight"
    train(config(tiny_qwen2, straight), log=quiet)
    steps = [r["step"] for r in read_metrics(straight) if r["kind"] == "train"]
    assert steps == list(range(1, 9))

    # stop during step 5 (Ctrl-C/SIGTERM): the loop finishes the step, saves checkpoint-5 (mid-epoch), exits
    stopped = tmp_path / "stopped"
    on_forward(monkeypatch, lambda i, run, out: os.kill(os.getpid(), signal.SIGTERM) if i == 4 * 2 else None)
    summary = train(config(tiny_qwen2, stopped), log=quiet)
    monkeypatch.undo()
    assert summary["stopped_early"] and summary["step"] == 5
    assert [c.step for c in ckpt.list_checkpoints(stopped)] == [3, 5]
    assert not (stopped / "adapter_model.safetensors").exists()

    # then what a SIGKILL in the middle of the next save leaves behind
    (stopped / ".tmp-checkpoint-6-31337").mkdir()
    (stopped / ".tmp-checkpoint-6-31337" / "adapter_model.safetensors").write_bytes(b"half a file")
    (stopped / "checkpoint-7").mkdir()
    with (stopped / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"kind": "train", "step": 6, "loss": 1.0}) + "\n{\"kind\": \"tra")
    said: list[str] = []
    train(config(tiny_qwen2, stopped), resume="latest", log=said.append)
    assert any(m.startswith("notice: removed 2 leftover(s)") for m in said)
    assert any(m.startswith(f"resuming from {stopped / 'checkpoint-5'} (step 5 of 8") for m in said)
    assert_same_run(straight, stopped)

    # an explicit PATH to an older checkpoint: the newer ones are set aside, the result is the same again
    said.clear()
    train(config(tiny_qwen2, stopped), resume=str(stopped / "checkpoint-3"), log=said.append)
    assert any(m.startswith("notice: checkpoints newer than step 3 moved to") for m in said)
    assert [c.step for c in ckpt.list_checkpoints(stopped)] == [3, 6, 8]
    assert_same_run(straight, stopped)

    # and into a new output_dir from another run's checkpoint
    elsewhere = tmp_path / "elsewhere"
    train(config(tiny_qwen2, elsewhere), resume=str(straight / "checkpoint-6"), log=quiet)
    left, right = adapter(straight), adapter(elsewhere)
    assert all(torch.equal(left[k], right[k]) for k in left)


def test_sigterm_saves_a_checkpoint_and_exits_0(tiny_qwen2: Path, tmp_path: Path):
    cfg = config(tiny_qwen2, tmp_path / "out", max_steps=500, save_steps=2, eval_steps=0)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "thinktune", "train", str(cfg_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.time() + 240
    for line in proc.stdout:  # wait until training runs (the first checkpoint)
        lines.append(line)
        if "checkpoint saved:" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    text = "".join(lines) + out
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM: finishing this step, saving a checkpoint, then stopping" in text
    assert f"continue with: thinktune train {cfg_path} --resume latest" in text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stopped_early"] and 2 <= summary["step"] < 500
    assert ckpt.list_checkpoints(tmp_path / "out")[-1].step == summary["step"]
    assert "Traceback" not in err


def test_nan_steps_are_skipped_and_spikes_flagged(tiny_qwen2: Path, tmp_path: Path, monkeypatch):
    seen: dict[int, dict[str, torch.Tensor]] = {}
    step = {"now": 0}

    def hook(i: int, run, output):
        step["now"] = i + 1  # grad_accum 1: forward i belongs to step i + 1
        if i in (1, 2):  # the adapters as step 2 starts, and as step 3 starts
            seen[i] = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
        if i == 0:
            for p in run.model.parameters():
                if p.requires_grad:
                    p.register_hook(lambda g: g * 1e4 if step["now"] == 8 else g)
        return output * float("nan") if i == 1 else None

    on_forward(monkeypatch, hook)
    out = tmp_path / "out"
    summary = train(config(tiny_qwen2, out, grad_accum=1, save_steps=0, eval_steps=0), log=quiet)
    assert summary["bad_steps"] == [2] and summary["spikes"] == [8] and summary["step"] == 8
    assert all(torch.equal(seen[1][n], seen[2][n]) for n in seen[1])  # the NaN step updated nothing
    records = {r["step"]: r for r in read_metrics(out) if r["kind"] == "train"}
    assert records[2]["skipped"] is True and records[2]["loss"] is None
    assert records[8]["spike"] is True and not any(records[s]["spike"] for s in (1, 3, 4, 5, 6, 7))
    assert records[8]["grad_norm"] > 1e3 * records[7]["grad_norm"]  # the pre-clip norm is what is logged


def write_cfg(cfg, path: Path) -> str:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return str(path)


def one_error_line(err: str) -> str:
    """The error is one line, the last on stderr (above it only the progress bar), with no traceback."""
    lines = [line.split("\r")[-1] for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


def test_consecutive_bad_steps_stop_with_a_usable_checkpoint(tiny_qwen2: Path, tmp_path: Path, monkeypatch, capsys):
    on_forward(monkeypatch, lambda i, run, out: out * float("inf") if i >= 2 else None)
    out = tmp_path / "out"
    cfg = config(tiny_qwen2, out, grad_accum=1, save_steps=2, eval_steps=0, max_bad_steps=2, max_steps=20)
    code = main(["train", write_cfg(cfg, tmp_path / "c.yaml")])
    line = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert "2 steps in a row (steps 3-4) had a NaN/Inf" in line and str(out / "checkpoint-4") in line
    ckpt.check_checkpoint_files(out / "checkpoint-4")
    before, after = adapter(out / "checkpoint-2"), adapter(out / "checkpoint-4")
    assert all(torch.equal(before[k], after[k]) for k in before)  # bad steps left the weights as they were
    assert json.loads((out / "summary.json").read_text())["bad_steps"] == [3, 4]


def test_out_of_memory_is_one_clear_line(tiny_qwen2: Path, tmp_path: Path, monkeypatch, capsys):
    def hook(i, run, output):
        if i == 2 * 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    on_forward(monkeypatch, hook)
    out = tmp_path / "out"
    code = main(["train", write_cfg(config(tiny_qwen2, out, save_steps=2, eval_steps=0), tmp_path / "c.yaml")])
    line = one_error_line(capsys.readouterr().err)
    assert code == 3
    assert "out of memory at step 3" in line and "train.batch_size (now 2" in line
    assert "data.max_seq_length (now 320)" in line and f"{out / 'checkpoint-2'} is intact" in line
    ckpt.check_checkpoint_files(out / "checkpoint-2")
    assert not [p for p in out.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)]


def test_second_ctrl_c_quits_without_saving_then_rerun_says_what_to_do(tiny_qwen2: Path, tmp_path: Path):
    # 96 micro-batches a step (~3 s here): the 0.05 s between the two signals nearly always falls inside one step
    cfg = config(tiny_qwen2, tmp_path / "out", max_steps=500, save_steps=400, eval_steps=0, grad_accum=96)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "thinktune", "train", str(cfg_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the loop is about to start
        if line.startswith("global batch:"):
            break
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)  # long enough for the first to be handled, much shorter than a step and its save
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "SIGINT again: quitting now without saving" in out and "interrupted: quit without saving" in err
    assert "Traceback" not in err and not ckpt.list_checkpoints(tmp_path / "out")
    # running it again: the message says how to go on
    rerun = subprocess.run([sys.executable, "-m", "thinktune", "train", str(cfg_path)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 2
    assert "stopped before its first checkpoint" in rerun.stderr and "--resume latest" in rerun.stderr
    assert "--overwrite" in rerun.stderr and rerun.stderr.count("\n") == 1


def test_resume_latest_on_a_finished_run_trains_nothing(tiny_qwen2: Path, tmp_path: Path, capsys):
    from thinktune.cli import main

    out = tmp_path / "out"
    cfg = config(tiny_qwen2, out, max_steps=3, save_steps=1, save_total_limit=1, eval_steps=0)
    said: list[str] = []
    train(cfg, log=said.append)
    assert "removed checkpoint-1 (train.save_total_limit=1 keeps the newest)" in said
    assert any(line.startswith("removed checkpoint-2 (train.save_total_limit=1 keeps the newest") for line in said)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    before = (out / "adapter_model.safetensors").read_bytes(), (out / "metrics.jsonl").read_text()
    assert main(["train", str(cfg_path), "--resume", "latest"]) == 0
    printed = capsys.readouterr().out
    assert "nothing to train" in printed and "finished run (3 of 3 steps)" in printed
    assert (before[0], before[1]) == ((out / "adapter_model.safetensors").read_bytes(), (out / "metrics.jsonl").read_text())
    # asking for more steps does train on
    assert main(["train", str(cfg_path), "train.max_steps=4", "--resume", "latest"]) == 0
    assert "nothing to train" not in capsys.readouterr().out
    assert ckpt.list_checkpoints(out)[-1].step == 4
    # --overwrite replaces the run
    assert main(["train", str(cfg_path), "--overwrite"]) == 0
    assert ckpt.list_checkpoints(out)[-1].step == 3
