"""Formats users bring: detection (with its one-line notice), conversion to Samples, and the labels they train.

Each format is written as a real file, loaded through `load_samples`, tokenised by
`build_examples`, and checked on what the model is trained on: the loss span decoded.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from thinktune.cli import main
from thinktune.config import DataConfig
from thinktune.data import (IGNORE_INDEX, DataReport, PromptFormat, Sample, Turn, build_examples, load_samples,
                            tokenize_sample)
from thinktune.errors import UserError
from thinktune.formats import split_think


@pytest.fixture()
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def write_rows(folder: Path, rows: list[dict], name: str = "rows.jsonl") -> str:
    path = folder / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def trained_text(example, tokenizer) -> str:
    return tokenizer.decode([t for t, lab in zip(example.input_ids, example.labels) if lab != IGNORE_INDEX])


def load_one(path: str, **data) -> tuple[Sample, DataReport]:
    samples, report = load_samples(path, DataConfig(**data))
    return samples[0], report


# ----------------------------------------------------------------------------- one case per format

CASES = {
    "seed columns": (
        [{"Question": "What is sepsis?", "Complex_CoT": "Infection plus organ dysfunction.", "Response": "A syndrome."}],
        "columns (question <- Question, thinking <- Complex_CoT, answer <- Response)",
        Sample("What is sepsis?", "Infection plus organ dysfunction.", "A syndrome.")),
    "alpaca": (
        [{"instruction": "Name the vitamin.", "input": "Deficiency causes scurvy.", "output": "Vitamin C."}],
        "alpaca (question <- instruction + input",
        Sample("Name the vitamin.\n\nDeficiency causes scurvy.", "", "Vitamin C.")),
    "alpaca with <think> in output": (
        [{"instruction": "Name the vitamin.", "input": "", "output": "<think>\nScurvy is vitamin C lack.\n</think>\n\nVitamin C."}],
        "alpaca (", Sample("Name the vitamin.", "Scurvy is vitamin C lack.", "Vitamin C.")),
    "one answer column with <think>": (
        [{"question": "What is shock?", "answer": "<think>Low perfusion.</think>Circulatory failure."}],
        "columns (question <- question, thinking <- a <think> block in answer, else empty, answer <- answer)",
        Sample("What is shock?", "Low perfusion.", "Circulatory failure.")),
    "R1 output without the opening tag": (
        [{"prompt": "What is shock?", "completion": "Low perfusion.\n</think>\n\nCirculatory failure."}],
        "columns (question <- prompt", Sample("What is shock?", "Low perfusion.", "Circulatory failure.")),
    "CoT column already wrapped in <think>": (
        [{"Question": "Q?", "Complex_CoT": "<think>\nreasoning\n</think>", "Response": "A."}],
        "columns (", Sample("Q?", "reasoning", "A.")),
    "DeepSeek reasoning_content columns": (
        [{"prompt": "What is 2+2?", "reasoning_content": "Two plus two.", "content": "4"}],
        "columns (question <- prompt, thinking <- reasoning_content, answer <- content)",
        Sample("What is 2+2?", "Two plus two.", "4")),
    "no CoT at all": (
        [{"question": "Capital of France?", "answer": "Paris."}],
        "thinking <- a <think> block in answer, else empty", Sample("Capital of France?", "", "Paris.")),
    "TRL conversational prompt/completion": (
        [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
          "completion": [{"role": "assistant", "content": "<think>add</think>4"}]}],
        "columns (question <- prompt, thinking <- a <think> block in completion, else empty, answer <- completion)",
        Sample("What is 2+2?", "add", "4", "Be brief.")),
    "sharegpt": (
        [{"conversations": [{"from": "system", "value": "You are terse."}, {"from": "human", "value": "Hi?"},
                            {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "What is 2+2?"},
                            {"from": "gpt", "value": "<think>add</think>4"}]}],
        "sharegpt (conversations: from/value turns",
        Sample("What is 2+2?", "add", "4", "You are terse.", [Turn("user", "Hi?"), Turn("assistant", "Hello.")])),
    "openai messages with reasoning_content": (
        [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                       {"role": "assistant", "content": "Hello.", "reasoning_content": "greet back"},
                       {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
                       {"role": "assistant", "content": "4", "reasoning_content": "two and two"}]}],
        "messages (messages: role/content turns",
        Sample("What is 2+2?", "two and two", "4", "Be brief.",
               [Turn("user", "Hi?"), Turn("assistant", "Hello.", "greet back")])),
}


@pytest.mark.parametrize("name", list(CASES))
def test_format_is_detected_and_converted(name: str, tmp_path: Path, tokenizer):
    rows, notice, expected = CASES[name]
    sample, report = load_one(write_rows(tmp_path, rows))
    assert notice in report.format_notice and report.format_notice in report.summary()
    assert sample == expected
    # the trained span: the thinking (empty block when none), the answer, EOS; never a nested <think>
    fmt = PromptFormat("seed-en")
    ex = build_examples([sample], fmt, tokenizer, DataConfig(max_seq_length=4096), DataReport("x"))[0]
    trained = trained_text(ex, tokenizer)
    assert trained == f"{expected.cot}\n</think>\n{expected.response}\n<|im_end|>"
    assert (fmt.sample_prompt(sample) + fmt.completion(sample.cot, sample.response)).count("<think>") == 1


def test_format_can_be_forced_and_says_what_it_needs(tmp_path: Path):
    path = write_rows(tmp_path, [{"instruction": "Q", "output": "A", "messages": "not a list"}])
    with pytest.raises(UserError, match=r"no usable rows .*; row 1 has an empty or non-list messages"):
        load_samples(path, DataConfig())  # auto looks at conversations first
    assert load_one(path, format="alpaca")[0] == Sample("Q", "", "A")
    assert load_one(path, format="alpaca")[1].format_notice.startswith(f"format of {path}: alpaca")
    with pytest.raises(UserError, match="data.format=sharegpt needs a 'messages' or 'conversations' column"):
        load_samples(write_rows(tmp_path, [{"q": "x"}], "other.jsonl"), DataConfig(format="sharegpt"))


def test_unusable_conversations_are_skipped_and_named(tmp_path: Path):
    good = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    no_answer = {"messages": [{"role": "user", "content": "Q"}]}
    _, report = load_samples(write_rows(tmp_path, [good, no_answer, good]), DataConfig())
    assert "3 rows read" in report.summary() and "1 skipped (e.g. row 2 has no final assistant answer in messages)" in report.summary()


def test_split_think_never_nests():
    assert split_think("<think>a</think>b") == ("a", "b")
    assert split_think("a</think>b") == ("a", "b")
    assert split_think("plain answer") == ("", "plain answer")


# ----------------------------------------------------------------------------- multi-turn rendering and labels

CONVERSATION = Sample("What is 2+2?", "two and two", "Four.", "Be brief.",
                      [Turn("user", "Hi there?"), Turn("assistant", "Hello friend.", "greet back")])


@pytest.mark.parametrize("template", ["seed-en", "chat"])
@pytest.mark.parametrize("history_thinking", ["drop", "keep"])
def test_earlier_turns_keep_or_drop_their_thinking(template: str, history_thinking: str, tokenizer):
    fmt = PromptFormat(template, tokenizer, history_thinking=history_thinking)
    prompt = fmt.sample_prompt(CONVERSATION)
    assert "Hi there?" in prompt and "Hello friend." in prompt and "Be brief." in prompt
    assert ("greet back" in prompt) == (history_thinking == "keep")
    if history_thinking == "keep":  # written as the completion of that template would be
        completion = fmt.completion("greet back", "Hello friend.").rstrip("\n")
        assert f"<think>\n{completion}" in prompt
    assert prompt.endswith("<think>\n") and prompt.index("Hello friend.") < prompt.index("What is 2+2?")


@pytest.mark.parametrize("template", ["seed-en", "chat"])
def test_loss_on_last_or_every_assistant_turn(template: str, tokenizer):
    fmt = PromptFormat(template, tokenizer)
    last = tokenize_sample(CONVERSATION, fmt, tokenizer, loss_turns="last")
    every = tokenize_sample(CONVERSATION, fmt, tokenizer, loss_turns="all")
    assert last.input_ids == every.input_ids  # the same tokens; only the labels differ
    assert "Hello friend." not in trained_text(last, tokenizer)
    assert trained_text(last, tokenizer).startswith("two and two")
    trained = trained_text(every, tokenizer)
    assert "Hello friend." in trained and "Hi there?" not in trained and "What is 2+2?" not in trained
    if template == "chat":  # the earlier turn's end-of-turn token is trained too
        assert trained.startswith("Hello friend.<|im_end|>")
    # the inference prompt is still the training prefix
    prompt_ids = tokenizer(fmt.sample_prompt(CONVERSATION))["input_ids"]
    assert every.input_ids[: len(prompt_ids)] == prompt_ids


def test_instruction_replaces_the_seed_instruction_and_becomes_the_chat_system(tokenizer):
    seed = PromptFormat("seed-en", instruction="You are a cardiologist. Answer briefly.")
    prompt = seed.prompt("Q?")
    assert "### Instruction:\nYou are a cardiologist. Answer briefly.\n\n### Question:\nQ?" in prompt
    assert "medical expert" not in prompt
    assert "medical expert" in PromptFormat("seed-en").prompt("Q?")
    zh = PromptFormat("seed-zh", instruction="你是一位心脏科医生。")
    assert "### Instruction:\n你是一位心脏科医生。\n" in zh.prompt("Q?") and "医学专家" not in zh.prompt("Q?")
    chat = PromptFormat("chat", tokenizer, instruction="You are a cardiologist.")
    assert chat.prompt("Q?").startswith("<|im_start|>system\nYou are a cardiologist.<|im_end|>")
    # a row's own system message wins
    assert "Be brief." in chat.sample_prompt(CONVERSATION) and "cardiologist" not in chat.sample_prompt(CONVERSATION)


CLI_ROWS = {
    "messages": lambda i: {"messages": [{"role": "user", "content": f"What is {i}+{i}?"},
                                        {"role": "assistant", "content": f"<think>double {i}</think>{2 * i}"}]},
    "sharegpt": lambda i: {"conversations": [{"from": "human", "value": f"What is {i}+{i}?"},
                                             {"from": "gpt", "value": f"<think>double {i}</think>{2 * i}"}]},
    "alpaca": lambda i: {"instruction": f"What is {i}+{i}?", "input": "", "output": f"<think>double {i}</think>{2 * i}"},
}


@pytest.mark.parametrize("layout", list(CLI_ROWS))
def test_the_data_command_announces_the_format_and_shows_the_loss_span(layout: str, tmp_path: Path, tiny_qwen2: Path,
                                                                      capsys):
    import yaml

    from conftest import tiny_config

    path = write_rows(tmp_path, [CLI_ROWS[layout](i) for i in range(6)])
    cfg = tiny_config(tiny_qwen2, tmp_path / "out", data={"path": path, "template": "chat"})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["data", str(config), "--examples", "1"]) == 0
    out = capsys.readouterr().out
    assert f"format of {path}: {layout} (" in out and f"{path}: 6 rows read, 6 used" in out
    assert "<|im_start|>user\nWhat is 0+0?<|im_end|>\n<|im_start|>assistant\n<think>\n[[LOSS>double 0\n</think>\n\n0<|im_end|><LOSS]]" in out


def test_generation_prompts_with_the_adapters_instruction(tmp_path: Path, tokenizer):
    from thinktune.config import RunConfig
    from thinktune.generation import prompt_format

    cfg = RunConfig()
    cfg.data.template, cfg.data.instruction = "seed-en", "You are a cardiologist."
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    fmt = prompt_format(tmp_path, None, tokenizer)
    assert fmt.prompt("Q?") == PromptFormat.from_config(cfg.data).prompt("Q?")
    assert "### Instruction:\nYou are a cardiologist.\n" in fmt.prompt("Q?")
    assert "medical expert" in prompt_format(tmp_path / "foreign", "seed-en", tokenizer).prompt("Q?")


def test_training_runs_on_multi_turn_sharegpt_with_loss_on_every_turn(tmp_path: Path, tiny_qwen2: Path):
    from conftest import tiny_config
    from thinktune.loop import train

    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": f"Hi {i}?"},
                               {"from": "gpt", "value": f"Hello {i}."}, {"from": "human", "value": f"What is {i}+{i}?"},
                               {"from": "gpt", "value": f"<think>double {i}</think>{2 * i}"}]} for i in range(8)]
    lines: list[str] = []
    cfg = tiny_config(tiny_qwen2, tmp_path / "out", data={"path": write_rows(tmp_path, rows), "template": "chat",
                                                          "loss_turns": "all", "history_thinking": "keep"},
                      train={"max_steps": 2, "save_steps": 0})
    summary = train(cfg, log=lines.append)
    assert summary and not summary["stopped_early"]
    assert any("sharegpt (conversations: from/value turns" in line for line in lines)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
