"""GGUF export: written with the gguf package, read back with transformers' GGUF loader (the reader users have)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import tiny_config
from thinktune.cli import main
from thinktune.data import PromptFormat
from thinktune.gguf_export import llama_permute, verify_gguf
from thinktune.loop import train
from thinktune.prompt_record import resolve_template

QUESTIONS = ["What is sepsis?", "Which drug treats anaphylaxis first? 0.5 mg"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_qwen2, tiny_llama) -> dict[str, Path]:
    """A tiny adapter per architecture, trained with the non-default seed-en template."""
    out = {}
    for arch, base in (("qwen2", tiny_qwen2), ("llama", tiny_llama)):
        folder = tmp_path_factory.mktemp(f"gguf-run-{arch}") / "out"
        train(tiny_config(base, folder, train={"max_steps": 3, "lr": 2e-2, "save_steps": 3}), log=lambda _: None)
        out[arch] = folder
    return out


@pytest.fixture(scope="module")
def merged(runs, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for arch, run in runs.items():
        out[arch] = tmp_path_factory.mktemp(f"gguf-merged-{arch}") / "merged"
        assert main(["merge", "--adapter", str(run), "--out", str(out[arch]), "--dtype", "fp32"]) == 0
    return out


def test_tuned_models_differ_from_their_base(merged, tiny_qwen2, tiny_llama):
    """So that a GGUF agreeing with the merged model means the adapter made it into the file."""
    for arch, base_dir in (("qwen2", tiny_qwen2), ("llama", tiny_llama)):
        tokenizer = AutoTokenizer.from_pretrained(merged[arch])
        ids = tokenizer(PromptFormat("seed-en", tokenizer).prompt(QUESTIONS[0]), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            base = AutoModelForCausalLM.from_pretrained(base_dir)(ids).logits
            tuned = AutoModelForCausalLM.from_pretrained(merged[arch])(ids).logits
        assert (base - tuned).abs().max() > 1e-3


@pytest.mark.parametrize("arch,gguf_type", [("qwen2", "f16"), ("qwen2", "bf16"), ("qwen2", "q8_0"), ("llama", "f16"),
                                            ("llama", "bf16"), ("llama", "q8_0")])
def test_export_reads_back_with_transformers(merged, arch, gguf_type, tmp_path: Path, capsys):
    out = tmp_path / f"{arch}.gguf"
    assert main(["export", "--base", str(merged[arch]), "--gguf", str(out), "--type", gguf_type]) == 0
    assert "prompt template: seed-en" in capsys.readouterr().out and out.is_file()
    fmt = PromptFormat("seed-en", AutoTokenizer.from_pretrained(merged[arch]))
    result = verify_gguf(out, merged[arch], [fmt.prompt(q) for q in QUESTIONS])
    assert result.gguf_type == gguf_type and result.ok, result.summary()
    if gguf_type == "f16":
        assert result.greedy_match is True


def test_tokenizer_chat_template_and_modelfile(runs, tmp_path: Path):
    out = tmp_path / "q.gguf"
    assert main(["export", "--adapter", str(runs["qwen2"]), "--gguf", str(out), "--type", "q8_0", "--verify"]) == 0
    hf = AutoTokenizer.from_pretrained(runs["qwen2"])
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    fmt = PromptFormat("seed-en", hf)
    for question in QUESTIONS + ["<|im_end|> 12345 \u75c5"]:
        prompt = fmt.prompt(question)
        assert loaded(prompt)["input_ids"] == hf(prompt)["input_ids"]
        rendered = loaded.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                              add_generation_prompt=True)
        assert rendered == prompt and rendered.endswith("<think>\n")
    assert loaded.eos_token == hf.eos_token
    modelfile = (tmp_path / "Modelfile").read_text(encoding="utf-8")
    prefix, suffix = fmt.prompt("\x00").split("\x00")
    assert modelfile.startswith(f"FROM ./{out.name}\n")
    assert f'TEMPLATE """{prefix}{{{{ .Prompt }}}}{suffix}"""' in modelfile
    assert f'PARAMETER stop "{hf.eos_token}"' in modelfile
    assert "PARAMETER temperature 0.6" in modelfile and "PARAMETER top_p 0.95" in modelfile


def test_generate_from_the_gguf_uses_its_recorded_template(runs, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("THINKTUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "q.gguf"
    assert main(["export", "--adapter", str(runs["qwen2"]), "--gguf", str(out), "--type", "f16"]) == 0
    assert resolve_template(None, out, None) == ("seed-en", f"{out}'s metadata")
    answers = []
    for source in (["--adapter", str(runs["qwen2"])], ["--base", str(out)]):
        file = tmp_path / f"answers{len(answers)}.jsonl"
        assert main(["generate", *source, "--max-new-tokens", "8", "--no-stream", "--out", str(file), QUESTIONS[0]]) == 0
        answers.append(json.loads(file.read_text().splitlines()[0])["text"])
    assert "prompt template: seed-en" in capsys.readouterr().out
    assert answers[0] == answers[1]


def test_llama_permutation_is_what_transformers_reverses():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rng = np.random.default_rng(0)
    for n_head, n_kv, rows in ((4, 4, 32), (4, 2, 16)):
        weights = rng.standard_normal((rows, 12)).astype(np.float32)
        permuted = llama_permute(weights, n_head, n_kv)
        assert not np.array_equal(permuted, weights)
        back = LlamaTensorProcessor()._reverse_permute_weights(permuted, n_head, n_kv)
        assert np.array_equal(back, weights)


def test_export_bad_input(runs, tmp_path: Path, capsys):
    out = tmp_path / "x.gguf"
    assert main(["export", "--adapter", str(runs["qwen2"]), "--gguf", str(out), "--type", "q4_k_m"]) == 2
    assert "llama-quantize" in capsys.readouterr().err and not out.exists()
    out.write_bytes(b"keep")
    assert main(["export", "--adapter", str(runs["qwen2"]), "--gguf", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"keep"
    assert main(["export", "--base", str(tmp_path), "--gguf", str(tmp_path / "y.gguf")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["export", "--gguf", str(tmp_path / "z.gguf")]) == 2
    assert list(tmp_path.iterdir()) == [out]  # no scratch folder left behind


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bitsandbytes 4-bit)")
def test_qlora_run_merges_into_the_dequantised_base(tmp_path: Path, tiny_qwen2, capsys):
    run = tmp_path / "qlora"
    train(tiny_config(tiny_qwen2, run, model={"load_in_4bit": True, "device": "cuda"},
                      train={"max_steps": 3, "lr": 2e-2, "precision": "bf16"}), log=lambda _: None)
    out = tmp_path / "q.gguf"
    assert main(["export", "--adapter", str(run), "--gguf", str(out), "--type", "f16", "--verify"]) == 0
    assert "dequantised 4-bit base" in capsys.readouterr().out


@pytest.mark.slow
def test_real_model_exports_and_reads_back(tmp_path: Path):
    """SmolLM2-135M (Llama architecture): 2 real steps, then f16 GGUF == merged model (greedy tokens)."""
    run = tmp_path / "demo"
    assert main(["train", "demo", f"output.output_dir={run}", "train.max_steps=2", "train.save_steps=2",
                 "train.eval_steps=0", "data.max_rows=8", "train.batch_size=2"]) == 0
    out = tmp_path / "smollm2-tuned.gguf"
    assert main(["export", "--adapter", str(run), "--gguf", str(out), "--type", "f16", "--verify"]) == 0
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(run), "--out", str(merged), "--dtype", "fp32"]) == 0
    fmt = PromptFormat("seed-en", AutoTokenizer.from_pretrained(merged))
    result = verify_gguf(out, merged, [fmt.prompt(q) for q in QUESTIONS], greedy_tokens=12)
    assert result.ok and result.greedy_match, result.summary()
