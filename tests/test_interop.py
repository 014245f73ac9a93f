"""What a run leaves behind loads in the peers' own loaders, and older runs still work.

A checkpoint or output_dir holds a PEFT adapter, the tokenizer and thinktune's run config
(thinktune_config.json). transformers reads a folder's `config.json` as a model config, so
the run config must not use that name: `AutoModelForCausalLM` would fail ("model_type") and
`AutoTokenizer` would warn about a Mistral regex for any >100k-entry tokenizer. Runs written
before the rename (config.json) still resume and evaluate.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from thinktune import checkpoint as ckpt
from thinktune.errors import UserError
from thinktune.export import load_with_adapter
from thinktune.generation import template_of
from thinktune.loop import train


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_qwen2) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    train(tiny_config(tiny_qwen2, out, train={"max_steps": 4, "lr": 5e-3}), log=lambda _: None)
    return out


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("where", ["checkpoint-4", "."])
def test_transformers_and_peft_load_the_run_folders(run: Path, tiny_qwen2: Path, where: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = (run / where).resolve()
    assert (folder / ckpt.CONFIG_FILE).is_file() and not (folder / "config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("### Question:\nWhat is sepsis?", return_tensors="pt")["input_ids"]
    assert ids.tolist() == AutoTokenizer.from_pretrained(tiny_qwen2)("### Question:\nWhat is sepsis?",
                                                                     return_tensors="pt")["input_ids"].tolist()
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    plain = logits(base, ids)
    peft = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_qwen2), str(folder)), ids)
    assert (peft - plain).abs().max() > 1e-3  # the adapter changes the model
    auto = AutoModelForCausalLM.from_pretrained(folder)  # transformers' own adapter loading (base from adapter_config)
    torch.testing.assert_close(logits(auto, ids), peft, rtol=1e-5, atol=1e-5)


def big_vocab_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer with Qwen2's vocabulary size (151,665 > 100,000: transformers checks its regex)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({f"tok{i}": len(vocab) + i for i in range(151_665 - len(vocab) - 1)})
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)


def test_no_false_regex_warning_for_a_large_tokenizer(run: Path, tmp_path: Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = tmp_path / "checkpoint"
    shutil.copytree(run / "checkpoint-4", folder)
    big_vocab_tokenizer(folder)  # as a run on a Qwen2-sized tokenizer leaves its checkpoint
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    root = hf_logging.get_logger("transformers")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    root.addHandler(handler)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    finally:
        root.removeHandler(handler)
        hf_logging.set_verbosity(level)
    assert len(tokenizer) > 100_000
    assert not [r for r in records if "regex" in r], records


def as_old_run(run: Path, dest: Path) -> Path:
    """The run as thinktune wrote it before the rename: config.json, and a marker without a file list."""
    shutil.copytree(run, dest)
    for path in [dest, *dest.glob("checkpoint-*")]:
        (path / ckpt.CONFIG_FILE).rename(path / ckpt.LEGACY_CONFIG_FILE)
    (dest / ckpt.RUN_FILE).write_text(json.dumps({"run_id": "old", "started": 0}))
    return dest


def test_old_runs_still_resume_and_load(run: Path, tiny_qwen2: Path, tmp_path: Path):
    old = as_old_run(run, tmp_path / "old")
    assert ckpt.read_run_config(old / "checkpoint-4")["model"]["name_or_path"] == str(tiny_qwen2)
    assert template_of(old, None) == "seed-en"
    model, _, model_cfg = load_with_adapter(old)
    assert model_cfg.name_or_path == str(tiny_qwen2)
    said: list[str] = []
    summary = train(tiny_config(tiny_qwen2, old, train={"max_steps": 6, "lr": 5e-3, "warmup_steps": 2}),
                    resume="latest", log=said.append)
    assert summary["step"] == 6 and (old / "checkpoint-6" / ckpt.CONFIG_FILE).is_file()
    assert any("train.warmup_steps 1 -> 2" in line for line in said)  # the old config.json was read
    with pytest.raises(UserError, match="was trained on base model"):
        train(tiny_config(tmp_path / "another-model", tmp_path / "old2"), resume=str(old / "checkpoint-4"))
    ckpt.claim_output_dir(old, "new", overwrite=True)  # the old marker: what those runs wrote goes, config.json too
    assert sorted(p.name for p in old.iterdir()) == [ckpt.RUN_FILE]


def test_a_model_config_json_is_not_a_run_config(tiny_qwen2: Path):
    assert ckpt.read_run_config(tiny_qwen2) is None  # transformers' config.json (model_type ...) is never taken for ours


@pytest.mark.slow
def test_embedded_adapter_names_a_base_any_machine_can_resolve(tmp_path: Path, monkeypatch):
    """SmolLM2 comes from a GGUF converted into a machine-local cache; the adapter names embedded:smollm2."""
    from thinktune.cli import main

    out = tmp_path / "run"
    assert main(["train", "demo", f"output.output_dir={out}", "train.max_steps=1", "train.save_steps=1",
                 "train.eval_steps=0", "data.max_rows=4", "train.batch_size=2"]) == 0
    for folder in (out, out / "checkpoint-1"):
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "embedded:smollm2"
    assert json.loads((out / "checkpoint-1" / ckpt.MARKER).read_text())["base_model"] == "embedded:smollm2"
    shared = tmp_path / "shared"  # the PEFT files alone, on a machine with an empty thinktune cache
    shared.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(out / name, shared / name)
    monkeypatch.setenv("THINKTUNE_CACHE", str(tmp_path / "another-machine-cache"))
    model, tokenizer, model_cfg = load_with_adapter(shared)
    assert model_cfg.name_or_path == "embedded:smollm2" and (tmp_path / "another-machine-cache" / "gguf").is_dir()
    ids = tokenizer("What is sepsis?", return_tensors="pt")["input_ids"]
    original, _, _ = load_with_adapter(out)
    torch.testing.assert_close(logits(model, ids), logits(original, ids), rtol=0, atol=0)
