"""Checks before loading, through the real CLI: missing files, 4-bit without CUDA, non-adapter folders and an
unreachable hub are reported in one line before any model or tokenizer loads, and a hub id fails within seconds."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_config
from thinktune import checks
from thinktune.cli import main

REPO = Path(__file__).resolve().parents[1]


def write(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


@pytest.fixture
def no_loading(monkeypatch):
    """Fail loudly if anything loads a tokenizer or a model: the checks must come first."""
    import thinktune.model as model

    def refuse(*args, **kwargs):
        raise AssertionError("a tokenizer or model was loaded before the check")

    for name in ("load_tokenizer", "load_base_model"):
        monkeypatch.setattr(model, name, refuse)
    for module in ("thinktune.setup", "thinktune.export"):
        mod = __import__(module, fromlist=["x"])
        for name in ("load_tokenizer", "load_base_model"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, refuse)


def test_validate_reports_every_missing_file_and_4bit_without_cuda(tiny_qwen2, tmp_path, capsys, no_loading):
    cfg = tiny_config(tiny_qwen2, tmp_path / "out", data={"path": "data/train.jsonl", "eval_path": "./held.jsonl"},
                      model={"load_in_4bit": True})
    path = write(cfg, tmp_path / "c.yaml")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert "data/train.jsonl not found" in err and "./held.jsonl not found" in err and "data.eval_path (a local" in err
    if not torch.cuda.is_available():
        assert "model.load_in_4bit: 4-bit (QLoRA) loading needs a CUDA GPU" in err and "3 problems" in err
    # a good config passes and says what was checked
    assert main(["validate", str(write(tiny_config(tiny_qwen2, tmp_path / "out"), tmp_path / "ok.yaml"))]) == 0
    assert "valid (keys, data files, model and device checked" in capsys.readouterr().err


def test_train_and_data_stop_on_a_missing_file_before_loading(tiny_qwen2, tmp_path, capsys, no_loading):
    path = write(tiny_config(tiny_qwen2, tmp_path / "out", data={"path": str(tmp_path / "nope.jsonl")}), tmp_path / "c.yaml")
    for command in (["train", str(path)], ["data", str(path)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.rstrip().endswith(f"{tmp_path / 'nope.jsonl'} not found") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # nothing written either


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_shipped_qlora_config_fails_validate_on_cpu(capsys):
    assert main(["validate", "configs/r1-medical-zh-qlora.yaml"]) == 2
    assert "needs a CUDA GPU and none is visible; set model.load_in_4bit=false" in capsys.readouterr().err


def test_non_adapter_folders_are_reported_before_loading(tmp_path, capsys, no_loading):
    folder = tmp_path / "not-an-adapter"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    questions = tmp_path / "q.txt"
    questions.write_text("Why?\n")
    for command in (["generate", "--adapter", str(folder), "Why?"], ["eval", "--adapter", str(folder)],
                    ["generate", "--adapter", str(tmp_path / "missing"), "--file", str(questions)],
                    ["generate", "--adapter", str(folder), "--file", str(tmp_path / "no-questions.txt")]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("holds no adapter" in err or "not found" in err), err


def run_cli(args: list[str], env_changes: dict[str, str | None], timeout: int = 120) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "thinktune", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    return proc, time.perf_counter() - start


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9", "http://unreachable.invalid"])
def test_hub_id_fails_fast_without_a_hub(tmp_path, endpoint):
    """HF_HUB_OFFLINE unset, the hub unreachable (refused connection, unknown host): one line with the offline
    fix, within seconds, instead of huggingface_hub's five retries (about a minute)."""
    env = {"HF_HUB_OFFLINE": None, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")}
    proc, seconds = run_cli(["generate", "--base", "someorg/some-model", "Why?"], env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model someorg/some-model is not in the local cache")
    assert "cannot be reached" in err[0] and "local folder" in err[0] and "HF_HUB_OFFLINE=1" in err[0]
    assert "Retry" not in proc.stderr and "Traceback" not in proc.stderr
    import_seconds = run_cli(["--version"], env)[1]  # python + this CLI's start-up on this (maybe busy) machine
    assert seconds < import_seconds + 30, seconds


def test_hub_id_with_hf_hub_offline_names_the_fix(tmp_path):
    proc, _ = run_cli(["generate", "--base", "someorg/some-model", "Why?"], {"HF_HUB_OFFLINE": "1",
                                                                           "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set" in proc.stderr
    assert "hf download someorg/some-model --local-dir DIR" in proc.stderr


def test_hub_problem_answers(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert checks.hub_answer("someorg/some-model") == "unreachable"
    assert "cannot be reached" in checks.hub_problem("someorg/some-model")
    assert checks.looks_like_file("data/train.jsonl") and checks.looks_like_file("./x")
    assert not checks.looks_like_file("FreedomIntelligence/medical-o1-reasoning-SFT")
