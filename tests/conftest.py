"""Shared fixtures: tiny random Qwen2 and Llama models with a real (tiny, trained-here) tokenizer.

No downloads: the tokenizer is a byte-level BPE trained on the packaged sample data,
the models are random-init transformers models saved to a temp folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "thinktune" / "sample_data"
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    texts = []  # a fixed corpus: the tokenizer (and every test's token counts) must not change when a sample file is added
    for file in [SAMPLE_DIR / f"medical_{lang}_{part}.jsonl" for lang in ("en", "zh") for part in ("heldout", "train")]:
        for line in file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                texts.extend(str(v) for v in row.values())
    texts.append("### Instruction: ### Question: ### Response: <think> </think> Below is an instruction")
    return texts


def build_tokenizer(folder: Path, vocab_size: int = 2000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   bos_token="<|im_start|>", unk_token=None)
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


def build_model(folder: Path, arch: str, vocab_size: int, tie: bool = False) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=tie, eos_token_id=2, pad_token_id=2, bos_token_id=1)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(folder)
    return folder


def _model_dir(tmp_path_factory, tiny_tokenizer_dir: Path, arch: str, tie: bool) -> Path:
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp(f"tiny-{arch}")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.save_pretrained(folder)
    build_model(folder, arch, len(tokenizer), tie)
    return folder


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return _model_dir(tmp_path_factory, tiny_tokenizer_dir, "qwen2", tie=False)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return _model_dir(tmp_path_factory, tiny_tokenizer_dir, "llama", tie=True)


@pytest.fixture(params=["qwen2", "llama"])
def tiny_model(request, tiny_qwen2, tiny_llama) -> Path:
    return tiny_qwen2 if request.param == "qwen2" else tiny_llama


def tiny_config(model_dir: Path, output_dir: Path, **sections) -> "RunConfig":  # noqa: F821
    """A RunConfig for a fast CPU run of a tiny model on the English sample data."""
    from thinktune.config import config_from_dict

    data = {
        "model": {"name_or_path": str(model_dir), "device": "cpu"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"path": "sample:en", "template": "seed-en", "max_seq_length": 512, "max_rows": 24,
                 "overlong": "truncate"},  # short windows keep the tiny runs fast; the cut rows are fine for them
        "train": {"batch_size": 2, "grad_accum": 2, "max_steps": 6, "lr": 1e-3, "warmup_steps": 1,
                  "optimizer": "adamw", "precision": "fp32", "gradient_checkpointing": False,
                  "logging_steps": 1, "save_steps": 2, "seed": 1},
        "output": {"output_dir": str(output_dir), "tensorboard": False},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    cache = os.environ.get("THINKTUNE_TEST_CACHE")
    if cache:
        monkeypatch.setenv("THINKTUNE_CACHE", cache)
