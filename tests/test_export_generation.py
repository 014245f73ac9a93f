"""Merge and generate on a tiny trained adapter; the slow test uses the real SmolLM2 demo model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from thinktune.cli import main
from thinktune.data import PromptFormat
from thinktune.errors import UserError
from thinktune.export import load_with_adapter, merge
from thinktune.generation import answer, read_questions, side_by_side
from thinktune.loop import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    train(tiny_config(tiny_llama, out, train={"max_steps": 4, "lr": 5e-3}), log=lambda _: None)
    return out


def greedy(model, tokenizer, n=12):
    ids = tokenizer("### Question:\nWhat is sepsis?", return_tensors="pt")["input_ids"]
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0].tolist()


def test_checkpoint_loads_with_plain_peft(trained: Path, tiny_llama: Path):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = PeftModel.from_pretrained(base, str(trained / "checkpoint-4"))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    assert (trained / "adapter_model.safetensors").is_file() and (trained / "adapter_config.json").is_file()


# max |logit difference| merged vs base + adapter (logits here are within +-1; measured: 1.5e-7 fp32, 3.1e-3 bf16,
# about bf16's resolution 2^-8 times the logit scale)
MERGE_ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def test_merge_matches_the_tuned_model_not_the_base(trained: Path, tmp_path: Path):
    tuned, tokenizer, _ = load_with_adapter(trained)
    ids = tokenizer("### Question:\nWhat is sepsis?\n### Response:\n<think>", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        tuned_logits = tuned(input_ids=ids).logits
        with tuned.disable_adapter():
            base_logits = tuned(input_ids=ids).logits
    # the adapter matters by far more than any tolerance below: a merge that dropped it would fail
    assert (tuned_logits - base_logits).abs().max() > 5 * max(MERGE_ATOL.values())
    out = merge(trained, tmp_path / "merged", dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, tuned_logits, rtol=0, atol=MERGE_ATOL[torch.float32])
    assert greedy(merged, tokenizer) == greedy(tuned, tokenizer)
    half = merge(trained, tmp_path / "merged16", dtype="bf16")
    model16 = AutoModelForCausalLM.from_pretrained(half)
    assert model16.dtype == torch.bfloat16 and (half / "tokenizer_config.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(model16(input_ids=ids).logits.float(), tuned_logits, rtol=0,
                                   atol=MERGE_ATOL[torch.bfloat16])
    with pytest.raises(UserError, match="not empty"):
        merge(trained, tmp_path / "merged")


def test_merge_is_done_in_fp32_then_cast(trained: Path, tmp_path: Path):
    """bf16 output == the fp32 merge rounded once, on any machine (a merge in bf16 rounds twice)."""
    from safetensors.torch import load_file

    full = load_file(str(merge(trained, tmp_path / "fp32", dtype="fp32") / "model.safetensors"))
    half = load_file(str(merge(trained, tmp_path / "bf16", dtype="bf16") / "model.safetensors"))
    assert full.keys() == half.keys()
    differ = [k for k in full if not torch.equal(half[k], full[k].to(torch.bfloat16))]
    assert not differ, f"{len(differ)} tensors differ from the fp32 merge cast to bf16, e.g. {differ[0]}"


def test_answer_splits_thinking_and_answer(trained: Path):
    model, tokenizer, _ = load_with_adapter(trained)
    fmt = PromptFormat("seed-en", tokenizer)
    pieces: list[str] = []
    ans = answer(model, tokenizer, fmt, "What is sepsis?", max_new_tokens=8, on_text=pieces.append)
    assert ans.new_tokens <= 8 and "".join(pieces).strip() == ans.text.strip()
    assert ans.closed_think == ("</think>" in ans.text)


def test_cli_generate_compare_and_file(trained: Path, tmp_path: Path, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "What is sepsis?"}) + "\n" + json.dumps({"Question": "What is gout?"}) + "\n")
    out = tmp_path / "answers.jsonl"
    assert main(["generate", "--adapter", str(trained), "--file", str(questions), "--compare",
                 "--max-new-tokens", "6", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question"] for r in rows] == ["What is sepsis?", "What is gout?"]
    assert {"base", "tuned"} <= set(rows[0]) and "thinking" in rows[0]["tuned"]
    printed = capsys.readouterr().out
    assert "BASE" in printed and "TUNED" in printed
    assert main(["generate", "--adapter", str(trained), "--max-new-tokens", "4", "--no-stream", "Why?"]) == 0
    assert capsys.readouterr().out.count("[answer]") == 1


def test_cli_generate_prints_each_answer_once(trained: Path, tmp_path: Path, capsys):
    from thinktune.generation import Model

    expected = Model(trained).answer("What is sepsis?", max_new_tokens=12)
    # streamed: the text as it comes, then only the status line (no second, formatted copy)
    assert main(["generate", "--adapter", str(trained), "--max-new-tokens", "12", "What is sepsis?"]) == 0
    printed = capsys.readouterr().out
    assert "[thinking]" not in printed and "[answer]" not in printed and printed.count("tokens)") == 1
    assert f"{expected.new_tokens} tokens)" in printed and expected.text in printed
    # --file: batched behind a progress bar on stderr, then each answer once, thinking and answer apart
    questions = tmp_path / "q.txt"
    questions.write_text("What is sepsis?\nWhat is gout?\nWhat is anaemia?\n")
    assert main(["generate", "--adapter", str(trained), "--max-new-tokens", "12", "--file", str(questions)]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("[thinking]") == 3 and captured.out.count("### What is sepsis?") == 1
    assert "answering 3 questions" in captured.err and "3/3 answers" in captured.err


def test_read_questions_errors(tmp_path: Path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"q": "x"}\n')
    with pytest.raises(UserError, match="line 1 has no 'question'"):
        read_questions(bad)
    plain = tmp_path / "q.txt"
    plain.write_text("one?\n\ntwo?\n")
    assert read_questions(plain) == ["one?", "two?"]
    assert "B" in side_by_side("a", "b", ("A", "B"))


@pytest.mark.slow
def test_real_demo_model_trains_merges_and_answers(tmp_path: Path):
    """A few real steps of SmolLM2-135M on the English sample data, then merge (bf16) == base+adapter (bf16)."""
    out = tmp_path / "demo"
    assert main(["train", "demo", f"output.output_dir={out}", "train.max_steps=3", "train.save_steps=2",
                 "train.eval_steps=0", "data.max_rows=12", "train.batch_size=2"]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("kind") == "train"]
    assert len(losses) >= 2 and all(l == l for l in losses)
    merged = merge(out, tmp_path / "merged", dtype="bf16")
    tuned, tokenizer, _ = load_with_adapter(out, overrides={"dtype": "bf16"})
    model16 = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16)
    assert greedy(model16, tokenizer, 8) == greedy(tuned, tokenizer, 8)
