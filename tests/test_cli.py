"""The CLI end to end on tiny models: validate, data, train, and the Python API."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

import thinktune
from conftest import tiny_config
from thinktune.cli import main


def write_yaml(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def test_validate_and_explain(capsys):
    assert main(["validate", "r1-medical-zh", "train.lr=1e-4"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["lr"] == 1e-4
    assert main(["validate", "--explain"]) == 0
    assert "max_grad_norm" in capsys.readouterr().out
    assert main(["validate", "r1-medical-zh", "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'train.lr'" in err and "Traceback" not in err


def test_data_preview(tiny_qwen2: Path, tmp_path: Path, capsys):
    cfg_path = write_yaml(tiny_config(tiny_qwen2, tmp_path / "out"), tmp_path / "c.yaml")
    assert main(["data", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("----- example") == 2 and out.count("[[LOSS>") >= 2
    assert "token lengths: rows 24" in out and "24 used" in out


def test_train_cli_and_api(tiny_qwen2: Path, tmp_path: Path, capsys):
    cfg_path = write_yaml(tiny_config(tiny_qwen2, tmp_path / "out"), tmp_path / "c.yaml")
    assert main(["train", str(cfg_path), "train.max_steps=2"]) == 0
    out_dir = tmp_path / "out"
    assert (out_dir / "adapter_model.safetensors").is_file() and (out_dir / "checkpoint-2").is_dir()
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert {"step", "epoch", "loss", "grad_norm", "lr", "tokens_per_s"} <= set(train_rows[0])
    assert "training path:" in capsys.readouterr().out
    # a second run into the same folder is refused, files untouched
    before = (out_dir / "adapter_model.safetensors").read_bytes()
    assert main(["train", str(cfg_path)]) == 2
    assert "holds another run" in capsys.readouterr().err
    assert (out_dir / "adapter_model.safetensors").read_bytes() == before
    summary = thinktune.train(str(cfg_path), overrides=[f"output.output_dir={tmp_path / 'api'}", "train.max_steps=1"])
    assert summary["step"] == 1 and not summary["stopped_early"]


def test_version_and_help_on_every_argument(capsys):
    import argparse

    import pytest

    from thinktune.cli import build_parser

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"thinktune {thinktune.__version__}"
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"thinktune {name} {action.dest}: no help text"
        text = command.format_help()
        for action in command._actions:  # every non-empty default is shown
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert f"default: {action.default}" in " ".join(text.split()), f"{name} {action.dest}"
    demo_help = " ".join(sub.choices["demo"].format_help().split())
    assert "(default: demo-output)" in demo_help and "(default: False)" not in demo_help


def test_estimate_full_and_cpu_config(capsys):
    assert main(["estimate", "r1-7b", "--mode", "full", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert main(["estimate", "r1-7b", "--mode", "lora", "--json"]) == 0
    lora = json.loads(capsys.readouterr().out)
    params = full["trainable_params"]
    assert 7.0e9 < params < 8.0e9 and full["mode"] == "full"
    # bf16 weights + bf16 grads + fp32 master copy; the seed's optimizer (adamw_8bit) ~2 bytes/param
    assert full["weights"] == 2 * params and full["grads"] == 2 * params and full["adapters"] == 4 * params
    assert 2 * params <= full["optimizer"] <= 2.1 * params
    assert full["peak"] > 4 * lora["peak"]
    assert main(["estimate", "r1-7b", "--mode", "full", "--optimizer", "adamw", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["optimizer"] == 8 * params + 4  # fp32 exp_avg + exp_avg_sq (+ step)
    assert main(["estimate", "--config", "configs/demo.yaml"]) == 0
    out = capsys.readouterr().out
    assert "a CPU run (model.device: cpu)" in out.splitlines()[0] and "trains on the CPU" in out
    assert main(["estimate", "--config", "configs/r1-medical-zh.yaml"]) == 0
    assert "CPU" not in capsys.readouterr().out
