"""GRPO through thinktune's own loop on a tiny model (CPU): metrics, PEFT checkpoints, exact resume, configs."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from thinktune import checkpoint as ckpt
from thinktune.config import load_config
from thinktune.errors import UserError
from thinktune.loop import train
from thinktune.metrics import read_metrics
from thinktune.reporting import build_report

REWARDS = '''
import os, signal

calls = {"n": 0}


def text_length(prompt, completion, reference, **row):
    """A random model never closes </think>: the text's length gives the groups some variance."""
    calls["n"] += 1
    stop_at = int(os.environ.get("THINKTUNE_TEST_SIGTERM_AT_REWARD", "0"))
    if stop_at and calls["n"] == stop_at:
        os.kill(os.getpid(), signal.SIGTERM)
    return float(len(completion) % 5)
'''


def quiet(message: str) -> None:
    pass


@pytest.fixture()
def rewards_module(tmp_path: Path, monkeypatch):
    folder = tmp_path / "rewards"
    folder.mkdir()
    (folder / "grpo_test_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(folder))
    yield "grpo_test_rewards:text_length"
    import sys

    sys.modules.pop("grpo_test_rewards", None)


def config(model_dir: Path, out: Path, reward: str, **train_opts):
    """4 problems, 2 per micro-batch x 3 completions, 2 micro-batches a step: every step straddles the data."""
    opts = {"objective": "grpo", "max_steps": 5, "grad_accum": 2, "batch_size": 2, "save_steps": 2, "eval_steps": 3,
            "logging_steps": 1, "lr": 5e-3, **train_opts}
    return tiny_config(model_dir, out, lora={"dropout": 0.0},
                       data={"path": "sample:verifiable-en", "eval_path": "sample:verifiable-en-heldout", "max_rows": 4},
                       train=opts,
                       rl={"group_size": 3, "max_completion_tokens": 6, "rewards": ["format", "accuracy", reward],
                           "eval_samples": 3, "temperature": 1.0})


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_grpo_trains_logs_and_resumes_exactly(tiny_qwen2: Path, tmp_path: Path, rewards_module: str, monkeypatch):
    straight = tmp_path / "straight"
    summary = train(config(tiny_qwen2, straight, rewards_module), log=quiet)
    assert summary["step"] == 5 and not summary["stopped_early"]
    records = read_metrics(straight)
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    for key in ("reward", "reward/format", "reward/accuracy", f"reward/{rewards_module}", "reward/format_std",
                "accuracy", "format_rate", "completion_length", "truncation_rate", "kl", "clip_fraction",
                "zero_variance_groups", "loss", "grad_norm"):
        assert key in steps[0], key
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3, 5] and {"eval_accuracy", "eval_format_rate"} <= set(evals[0])
    final = adapter(straight)
    base = adapter(straight / "checkpoint-2")
    assert any(not torch.equal(final[k], base[k]) for k in final)  # it learned something
    json.loads((straight / "adapter_config.json").read_text())  # a PEFT adapter
    html_path, md_path = build_report(straight, log=quiet)  # reward curves and the before/after table
    assert {"reward.png", "rl_accuracy.png", "completion_length.png", "loss.png"} <= {p.name for p in (straight / "plots").iterdir()}
    page = md_path.read_text()
    assert "Reinforcement learning: held-out problems before vs after" in page and "| accuracy |" in page
    assert "RL: mean reward" in page and "Reinforcement learning" in html_path.read_text()

    # SIGTERM while scoring the rollouts of step 3: the loop finishes step 3, saves checkpoint-3 and stops
    stopped = tmp_path / "stopped"
    import grpo_test_rewards

    grpo_test_rewards.calls["n"] = 0
    per_step = 2 * 2 * 3  # micro-batches x problems x completions; the step-0 evaluation scores 3 answers first
    monkeypatch.setenv("THINKTUNE_TEST_SIGTERM_AT_REWARD", str(3 + 2 * per_step + 1))
    summary = train(config(tiny_qwen2, stopped, rewards_module), log=quiet)
    monkeypatch.delenv("THINKTUNE_TEST_SIGTERM_AT_REWARD")
    assert summary["stopped_early"] and summary["step"] == 3
    train(config(tiny_qwen2, stopped, rewards_module), resume="latest", log=quiet)
    resumed = adapter(stopped)
    assert all(torch.equal(final[k], resumed[k]) for k in final)  # bit-identical adapter
    left = [r for r in read_metrics(straight) if r["kind"] == "train"]
    right = [r for r in read_metrics(stopped) if r["kind"] == "train"]
    drop = ("tokens_per_s", "seconds", "rollout_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in left] == \
        [{k: v for k, v in r.items() if k not in drop} for r in right]  # same completions, same rewards


def test_starts_from_an_sft_adapter(tiny_qwen2: Path, tmp_path: Path, rewards_module: str):
    sft = tmp_path / "sft"
    train(tiny_config(tiny_qwen2, sft, train={"max_steps": 2, "save_steps": 0}), log=quiet)
    said: list[str] = []
    out = tmp_path / "grpo"
    cfg = config(tiny_qwen2, out, rewards_module, max_steps=1, save_steps=0, eval_steps=0)
    cfg.model.adapter = str(sft)
    train(cfg, log=said.append)
    assert any(str(sft) in line and "adapter" in line for line in said)
    first = [r for r in read_metrics(out) if r["kind"] == "eval"][0]
    assert first["step"] == 0
    assert ckpt.list_checkpoints(out)
    missing = config(tiny_qwen2, tmp_path / "never", rewards_module)
    missing.model.adapter = str(tmp_path / "no-such-adapter")
    with pytest.raises(UserError, match="model.adapter: adapter folder .* not found"):
        train(missing, log=quiet)
    assert not (tmp_path / "never").exists()  # refused before anything was written


def test_rl_configs_load():
    demo = load_config("rl-demo")
    assert demo.train.objective == "grpo" and demo.model.name_or_path == "embedded:smollm2"
    assert demo.model.adapter == "demo-output" and demo.data.path == "sample:verifiable-en"
    recipe = load_config("r1-medical-grpo")
    assert recipe.model.name_or_path == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    assert recipe.data.path == "FreedomIntelligence/medical-o1-verifiable-problem" and recipe.rl.group_size == 8
    assert (recipe.rl.question_column, recipe.rl.answer_column) == ("Open-ended Verifiable Question", "Ground-True Answer")
    sft = load_config("r1-medical-zh")
    assert (recipe.lora.r, recipe.lora.alpha, recipe.lora.target_modules) == (sft.lora.r, sft.lora.alpha,
                                                                               sft.lora.target_modules)
    assert recipe.model.adapter == sft.output.output_dir
