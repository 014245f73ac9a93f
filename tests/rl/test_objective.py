"""The GRPO objective on a tiny model: rollout micro-batches, zero-variance groups, loss and gradient, eval."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from thinktune.config import LoraConfig, RLConfig
from thinktune.data import PromptFormat
from thinktune.lora import attach_lora
from thinktune.rl.objective import GRPOObjective, RolloutBatches, evaluate_problems
from thinktune.rl.problems import Problem

PROBLEMS = [Problem("Which organ makes bile?", "Liver"), Problem("Which organ pumps blood?", "Heart"),
            Problem("How many chambers does the heart have? Answer with a number.", "4"),
            Problem("Which vitamin prevents scurvy?", "Vitamin C")]


@pytest.fixture()
def setup(tiny_qwen2: Path, tmp_path: Path, monkeypatch):
    # a random model never closes </think>: a reward on the text's length gives the groups some variance
    (tmp_path / "rl_test_rewards.py").write_text(
        "def text_length(prompt, completion, reference, **row):\n    return float(len(completion) % 5)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    model = attach_lora(model, LoraConfig(r=4, alpha=8), seed=0, gradient_checkpointing=False)
    return model, tokenizer, PromptFormat("seed-en", tokenizer)


def source(setup, **rl) -> RolloutBatches:
    model, tokenizer, fmt = setup
    cfg = RLConfig(**{"group_size": 3, "max_completion_tokens": 8, "rewards": ["format", "rl_test_rewards:text_length"],
                      **rl})
    return RolloutBatches(model, tokenizer, fmt, PROBLEMS, cfg, batch_size=2, seed=5)


def test_same_position_same_rollouts(setup):
    batches = source(setup)
    first, again, other = batches.batch(3), batches.batch(3), batches.batch(1)
    assert first["input_ids"].shape[0] > 0
    for key in ("input_ids", "attention_mask", "loss_mask", "advantages", "stopped"):
        assert torch.equal(first[key], again[key])
    assert first["input_ids"].shape != other["input_ids"].shape or not torch.equal(first["input_ids"], other["input_ids"])
    stats = batches.take_stats().summary()
    assert stats["groups"] == 6 and stats["format_rate"] == 0.0 and "reward/rl_test_rewards:text_length" in stats
    assert batches.take_stats().completions == 0  # taken


def test_zero_variance_groups_are_dropped_and_counted(setup):
    batches = source(setup, temperature=0.0)  # greedy: the 3 completions of a prompt are equal
    batch = batches.batch(0)
    assert batch["input_ids"].shape[0] == 0
    stats = batches.take_stats()
    assert (stats.groups, stats.zero_variance_groups, stats.completions) == (2, 2, 6)
    model = setup[0]
    out = GRPOObjective(batches.rl).loss(model, batch)
    out.numerator.backward()  # an empty micro-batch contributes nothing, and backward still works
    assert out.count == 0 and all(p.grad is None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("normalization", ["sequence", "token", "constant"])
def test_loss_gives_adapter_gradients(setup, normalization: str):
    batches = source(setup, temperature=1.5, loss_normalization=normalization, beta=0.1, rewards=["rl_test_rewards:text_length"])
    objective = GRPOObjective(batches.rl)
    batch = next(b for b in (batches.batch(i) for i in range(8)) if b["input_ids"].shape[0])
    assert "ref_logps" in batch and not batch["ref_logps"].requires_grad
    out = objective.loss(setup[0], batch)
    assert out.count == objective.count(batch) > 0
    (out.numerator / out.count).backward()
    grads = [p.grad for n, p in setup[0].named_parameters() if "lora_" in n]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    assert out.kl_sum == pytest.approx(0.0, abs=1e-5)  # the adapter starts at zero (B = 0): policy == reference


def test_evaluate_problems_is_greedy_and_scores(setup):
    model, tokenizer, fmt = setup
    cfg = RLConfig(max_completion_tokens=6, rewards=["format", "accuracy"])
    first = evaluate_problems(model, tokenizer, fmt, PROBLEMS, cfg, batch_size=3)
    again = evaluate_problems(model, tokenizer, fmt, PROBLEMS, cfg, batch_size=4)
    assert first["examples"] == again["examples"] and first["problems"] == 4
    assert set(first) >= {"accuracy", "format_rate", "reward/format", "reward/accuracy", "completion_length"}
