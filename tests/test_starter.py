"""Configs a user can start from, through the real CLI: init, validate NAME --explain, configs/ paths from anywhere."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from thinktune.cli import main
from thinktune.config import SHIPPED_DIR, field_docs, load_config, TrainConfig

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_init_writes_commented_yaml_that_loads_to_the_same_config(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["init", name]) == 0
    written = tmp_path / f"{name}.yaml"
    assert f"wrote {name}.yaml" in capsys.readouterr().out
    text = written.read_text()
    assert load_config(written).to_dict() == load_config(name).to_dict()
    # each key the shipped file sets comes with its docstring as a comment right above it
    raw = yaml.safe_load((SHIPPED_DIR / f"{name}.yaml").read_text())
    lines = text.splitlines()
    doc = field_docs(TrainConfig)["lr"].split()[0]
    at = lines.index(f"  lr: {yaml.safe_dump(raw['train']['lr'], default_flow_style=True).strip().removesuffix('...').strip()}")
    assert lines[at - 1].startswith("  # ") and doc in " ".join(lines[at - 3: at])
    assert sum(1 for line in lines if line.startswith("  # ")) >= sum(len(v) for v in raw.values())
    # never overwrites without --force
    before = written.read_text()
    assert main(["init", name]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and written.read_text() == before
    assert main(["init", name, str(tmp_path / "sub" / "mine.yaml"), "--force"]) == 0
    assert load_config(tmp_path / "sub" / "mine.yaml").to_dict() == load_config(name).to_dict()


def test_init_unknown_name(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["init", "r1-medical"]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "did you mean" in err and not list(tmp_path.iterdir())


def test_validate_explain_explains_the_named_config(capsys):
    assert main(["validate", "demo", "train.lr=5e-4", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "  name_or_path: embedded:smollm2  # set" in out  # the config's value, marked as set by it
    assert "  lr: 0.0005  # set" in out  # overrides count
    assert "  max_grad_norm: 1.0\n" in out  # a default: not marked
    assert f"  # {field_docs(TrainConfig)['max_grad_norm'][:40]}" in out
    assert main(["validate", "--explain"]) == 0  # without a name: the defaults
    assert "name_or_path: deepseek-ai/DeepSeek-R1-Distill-Qwen-7B" in capsys.readouterr().out


def test_readme_config_paths_work_from_any_folder(tmp_path):
    """`configs/demo.yaml` works outside the repository (an installed package has no configs/ folder there),
    and a user's own configs/NAME.yaml wins over the shipped one."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    run = lambda *args: subprocess.run([sys.executable, "-m", "thinktune", *args], cwd=tmp_path, env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=120)
    proc = run("validate", "configs/demo.yaml")
    assert proc.returncode == 0, proc.stderr
    assert '"name_or_path": "embedded:smollm2"' in proc.stdout
    own = tmp_path / "configs"
    own.mkdir()
    (own / "demo.yaml").write_text("train:\n  lr: 0.01\n")
    proc = run("validate", "configs/demo.yaml")
    assert proc.returncode == 0 and '"lr": 0.01' in proc.stdout and "embedded:smollm2" not in proc.stdout
    assert not (REPO / "configs").exists()  # no symlink at the repository root to lean on
