"""A merged model keeps the prompt format of the run it came from."""
from __future__ import annotations

import json
import queue
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import tiny_config
from thinktune.cli import main
from thinktune.data import PromptFormat, split_thinking
from thinktune.errors import UserError
from thinktune.loop import train
from thinktune.prompt_record import chat_template, ollama_template, read_record, resolve_template
from thinktune.serve import build_job, load_engine


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_qwen2) -> Path:
    out = tmp_path_factory.mktemp("record-run") / "out"  # seed-en: not the default template (seed-zh)
    train(tiny_config(tiny_qwen2, out, train={"max_steps": 3, "lr": 2e-2, "save_steps": 3}), log=lambda _: None)
    return out


@pytest.mark.parametrize("template", ["seed-en", "seed-zh", "chat"])
def test_chat_template_renders_the_training_prompt(tiny_tokenizer_dir: Path, template: str):
    """transformers' own apply_chat_template, given our chat template, gives PromptFormat.prompt() exactly."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    fmt = PromptFormat(template, tokenizer)
    tokenizer.chat_template = chat_template(fmt)
    for question in ["What is sepsis?", "多尿、多饮的原因？\nLine two with {braces} and \"quotes\""]:
        messages = [{"role": "user", "content": question}]
        assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == fmt.prompt(question)
    if template != "chat":
        assert ollama_template(fmt) == fmt.prompt("{{ .Prompt }}")


def test_generate_from_merged_equals_generate_from_adapter(run: Path, tmp_path: Path, capsys):
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(run), "--out", str(merged), "--dtype", "fp32"]) == 0
    assert read_record(merged)["template"] == "seed-en"
    assert "prompt template: seed-en" in capsys.readouterr().out

    def greedy(*args: str) -> dict:
        out = tmp_path / "answers.jsonl"
        assert main(["generate", *args, "--max-new-tokens", "12", "--no-stream", "--out", str(out), "What is sepsis?"]) == 0
        return json.loads(out.read_text().splitlines()[0])

    from_adapter = greedy("--adapter", str(run))
    assert "prompt template: seed-en (from the run config" in capsys.readouterr().out
    from_merged = greedy("--base", str(merged))
    assert f"prompt template: seed-en (from {merged / 'thinktune.json'})" in capsys.readouterr().out
    assert from_merged["text"] == from_adapter["text"]
    # the recorded template matters: the default one gives another answer
    assert greedy("--base", str(merged), "--template", "seed-zh")["text"] != from_adapter["text"]

    # serve --base MERGED uses the recorded template too, and says so
    printed: list[str] = []
    engine = load_engine([], str(merged), None, log=printed.append)
    try:
        served = engine.served["merged"]
        assert served.fmt.template == "seed-en" and f"from {merged / 'thinktune.json'}" in printed[0]
        events: queue.Queue = queue.Queue()
        job = build_job(engine, {"model": "merged", "messages": [{"role": "user", "content": "What is sepsis?"}],
                                 "max_tokens": 12, "temperature": 0}, True, events.put)
        engine.submit(job)
        pieces = []
        while (event := events.get(timeout=120))[0] == "delta":
            pieces.append(event[1:])
        thinking = "".join(p[0] for p in pieces)
        assert thinking == split_thinking(from_adapter["text"])[0]
    finally:
        engine.close()


def test_template_resolution_and_bad_record(run: Path, tmp_path: Path):
    assert resolve_template(run, None, None)[0] == "seed-en"
    assert resolve_template(None, tmp_path, None) == ("seed-zh", "the default (no run config or thinktune.json found)")
    assert resolve_template(run, None, "chat") == ("chat", "--template")
    (tmp_path / "thinktune.json").write_text("{broken")
    with pytest.raises(UserError, match="not valid JSON"):
        resolve_template(None, tmp_path, None)
