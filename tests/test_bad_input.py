"""Every bad input through the real CLI: one `error:` line, exit code 2, no traceback, nothing of the user's touched.

Each case builds its inputs in a fresh folder, runs `thinktune.cli.main`, and checks the
message and that every file under the folder is byte-for-byte what it was before.
"""
from __future__ import annotations

import codecs
import gzip
import json
import shutil
import socket
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from conftest import tiny_config
from thinktune.cli import main
from thinktune.config import RunConfig
from thinktune.loop import train

ROW = {"Question": "What is sepsis?", "Complex_CoT": "Infection with organ dysfunction.", "Response": "A syndrome."}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_qwen2: Path) -> Path:
    """A finished 2-step run (checkpoint-1, checkpoint-2, final adapter) to copy into cases."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(tiny_qwen2, out, data={"max_rows": 4, "max_seq_length": 320},
                      train={"max_steps": 2, "save_steps": 1, "grad_accum": 1}), log=lambda _: None)
    return out


class Case:
    """What one case needs: its folder, the tiny models and the trained run."""

    def __init__(self, root: Path, qwen2: Path, llama: Path, trained: Path):
        self.root, self.qwen2, self.llama, self.trained = root, qwen2, llama, trained

    def config(self, **overrides: str) -> str:
        cfg = tiny_config(self.qwen2, self.root / "out", data={"max_rows": 4, "max_seq_length": 320},
                          train={"max_steps": 2, "save_steps": 1, "grad_accum": 1})
        path = self.root / "run.yaml"
        path.write_text(yaml.safe_dump(cfg.to_dict()))
        return str(path)

    def file(self, name: str, content: bytes | str) -> str:
        path = self.root / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)

    def rows(self, name: str, *rows: dict) -> str:
        return self.file(name, "".join(json.dumps(r) + "\n" for r in rows))

    def run_copy(self) -> Path:
        """The trained run, copied into this case's output_dir (so resume cases can damage it)."""
        return Path(shutil.copytree(self.trained, self.root / "out"))

    def model_copy(self, name: str) -> Path:
        return Path(shutil.copytree(self.qwen2, self.root / name))


def no_eos_model(c: Case) -> list[str]:
    folder = c.model_copy("no-eos")
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    tok_cfg.update(eos_token=None, pad_token=None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return ["train", c.config(), f"model.name_or_path={folder}"]


def pickle_only_model(c: Case) -> list[str]:
    from safetensors.torch import load_file

    folder = c.model_copy("bin-only")
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return ["train", c.config(), f"model.name_or_path={folder}"]


def damaged(c: Case, what: str) -> Path:
    run = c.run_copy()
    weights = run / "checkpoint-2" / "adapter_model.safetensors"
    if what == "corrupt":
        weights.write_bytes(b"\x00garbage" * 40)
    elif what == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        (run / "checkpoint-2" / "trainer_state.pt").write_bytes(b"PK\x03\x04 not a zip")
    return run


def stopped_run(c: Case) -> Path:
    """A run folder holding checkpoints but no final adapter (as after Ctrl-C)."""
    run = c.run_copy()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (run / name).unlink()
    return run


def empty_dir(c: Case, name: str) -> Path:
    (c.root / name).mkdir()
    return c.root / name


CASES: dict[str, tuple[Callable[[Case], list[str]], tuple[str, ...]]] = {
    # data files
    "data file missing": (lambda c: ["train", c.config(), f"data.path={c.root}/none.jsonl"], ("none.jsonl not found",)),
    "data path is a folder without data": (
        lambda c: ["train", c.config(), f"data.path={empty_dir(c, 'rows.jsonl')}"], ("folder holds no .json",)),
    "unknown format": (lambda c: ["train", c.config(), f"data.path={c.file('rows.txt', 'hi')}"],
                       ("unknown data format '.txt'",)),
    "invalid UTF-8": (lambda c: ["train", c.config(), "data.path=" + c.file(
        "rows.jsonl", json.dumps(ROW).encode() + b'\n{"Question": "\xff\xfe"}\n')], ("line 2 is not valid UTF-8",)),
    "broken JSONL line": (lambda c: ["train", c.config(), "data.path=" + c.file(
        "rows.jsonl", json.dumps(ROW) + '\n{"Question": "a",\n')], ("line 2 is not valid JSON",)),
    "renamed columns": (lambda c: ["train", c.config(), "data.path=" + c.rows(
        "rows.jsonl", {"Frage": "q", "Begruendung": "c", "Antwort": "a"})],
        ("missing column(s) Question, Complex_CoT, Response", "columns found: Frage, Begruendung, Antwort",
         "data.question_column=Frage data.cot_column=Begruendung data.response_column=Antwort")),
    # real-world files that cannot load: one clear line each
    "empty .jsonl": (lambda c: ["train", c.config(), "data.path=" + c.file("rows.jsonl", b"")], ("the file is empty",)),
    "blank lines only": (lambda c: ["train", c.config(), "data.path=" + c.file("rows.jsonl", "\n \r\n\n")],
                         ("holds no rows",)),
    "header-only CSV": (lambda c: ["train", c.config(), "data.path=" + c.file(
        "rows.csv", "\ufeffQuestion,Complex_CoT,Response\r\n")], ("a header (Question, Complex_CoT, Response) but no rows",)),
    "mixed encodings (a Latin-1 line in UTF-8)": (lambda c: ["train", c.config(), "data.path=" + c.file(
        "rows.jsonl", (json.dumps(ROW, ensure_ascii=False) + "\n").encode() * 3
        + json.dumps({**ROW, "Question": "fièvre?"}, ensure_ascii=False).encode("latin-1"))], ("line 4 is not valid UTF-8",)),
    "CSV row with more fields than the header": (lambda c: ["train", c.config(), "data.path=" + c.file(
        "rows.csv", "Question,Complex_CoT,Response\nq,c,a\nq,c,a, with a comma\n")], ("line 3 has 4 fields but the header has 3",)),
    "damaged gzip": (lambda c: ["train", c.config(), "data.max_rows=null", "data.path=" + c.file(
        "rows.jsonl.gz", gzip.compress((json.dumps(ROW) + "\n").encode() * 200)[:-40])], ("gzip stream is damaged",)),
    "damaged Parquet": (lambda c: ["train", c.config(), "data.path=" + c.file("rows.parquet", b"PAR1 not really")],
                        ("not a readable Parquet file",)),
    "a JSON object, not rows": (lambda c: ["train", c.config(), "data.path=" + c.file(
        "rows.json", json.dumps({"name": "x", "version": 1}, indent=2))], ("a JSON object, not rows",)),
    "UTF-16 without its byte-order mark": (lambda c: ["train", c.config(), "data.path=" + c.file(
        "rows.jsonl", (json.dumps(ROW) + "\n").encode("utf-16-le"))], ("line 1 is not valid JSON",)),
    "empty field with data.strict": (lambda c: ["train", c.config(), "data.strict=true", "data.path=" + c.rows(
        "rows.jsonl", ROW, {**ROW, "Question": "  "})], ("row 2 has an empty or non-text Question",)),
    "non-string field with data.strict": (lambda c: ["data", c.config(), "data.strict=true", "data.path=" + c.rows(
        "rows.jsonl", ROW, ROW, {**ROW, "Response": 42})], ("row 3 has an empty or non-text Response",)),
    "every row filtered out": (lambda c: ["train", c.config(), "data.path=" + c.rows(
        "rows.jsonl", {**ROW, "Question": ""}, {**ROW, "Complex_CoT": None})],
        ("no usable rows (2 read, 2 with empty or non-text fields)",)),
    "every row over max_seq_length": (lambda c: ["train", c.config(), "data.overlong=drop", "data.max_seq_length=64"],
                                      ("every row is longer than data.max_seq_length=64",)),
    # models and tokenizers
    "tokenizer without EOS": (no_eos_model, ("has no EOS token",)),
    "pickle-only model weights": (pickle_only_model, ("holds only pickle weights (*.bin)",)),
    "model folder missing": (lambda c: ["train", c.config(), f"model.name_or_path={c.root}/no-model"],
                             ("no-model not found",)),
    # config
    "misspelled key": (lambda c: ["train", c.config(), "train.bach_size=2"], ("did you mean 'train.batch_size'",)),
    "misspelled key in the YAML": (lambda c: ["validate", c.file("bad.yaml", "lora:\n  rank: 8\n")],
                                   ("unknown config key 'lora.rank'",)),
    "keys of other tools, each with its line": (lambda c: ["validate", c.file(
        "hf.yaml", "model:\n  max_seq_length: 2048\ntrain:\n  optim: adamw_torch\n  bf16: false\n")],
        ("3 problems", "hf.yaml line 2: unknown config key 'model.max_seq_length' (thinktune's key is data.max_seq_length)",
         "hf.yaml line 4: unknown config key 'train.optim' (thinktune's key is train.optimizer",
         "hf.yaml line 5: unknown config key 'train.bf16' (thinktune's key is train.precision: bf16)")),
    "overlong rows without opting in to truncation": (
        lambda c: ["train", c.config(), "data.overlong=error", "data.max_seq_length=200"],
        ("4 of 4 rows are longer than data.max_seq_length=200 tokens (p95 length", "raise data.max_seq_length",
         "data.overlong: drop")),
    "out-of-range value": (lambda c: ["train", c.config(), "lora.dropout=1.5"], ("lora.dropout = 1.5 is out of range",)),
    "wrong type": (lambda c: ["train", c.config(), "train.batch_size=two"], ("train.batch_size must be an integer",)),
    "unknown choice": (lambda c: ["train", c.config(), "data.template=seed_en"], ("did you mean 'seed-en'",)),
    "config file missing": (lambda c: ["train", f"{c.root}/none.yaml"], ("none.yaml not found",)),
    "config not YAML": (lambda c: ["train", c.file("bad.yaml", "model: [\n")], ("invalid YAML",)),
    "config not UTF-8": (lambda c: ["train", c.file("bad.yaml", b"model:\n  name_or_path: \xff\n")],
                         ("not valid UTF-8",)),
    # output_dir
    "output_dir of another run": (lambda c: ["train", c.config(), f"output.output_dir={c.run_copy()}"],
                                  ("holds another run", "--resume latest")),
    "output_dir with the user's files": (lambda c: ["train", c.config(), f"output.output_dir={c.root}",
                                                    "data.path=sample:en"], ("files thinktune did not write",)),
    # resume
    "checkpoint of another base model": (lambda c: ["train", c.config(), f"model.name_or_path={c.llama}",
                                                    f"output.output_dir={c.run_copy()}", "--resume", "latest"],
                                         ("was trained on base model",)),
    "checkpoint of another LoRA shape": (lambda c: ["train", c.config(), "lora.r=8", f"output.output_dir={c.run_copy()}",
                                                    "--resume", "latest"], ("has LoRA r=4", "asks r=8")),
    "corrupt adapter on resume": (lambda c: ["train", c.config(), f"output.output_dir={damaged(c, 'corrupt')}",
                                             "--resume", "latest"], ("checkpoint-2/adapter_model.safetensors is corrupt",)),
    "truncated adapter on resume from PATH": (lambda c: ["train", c.config(), f"output.output_dir={c.root}/new",
                                                         "--resume", f"{damaged(c, 'truncated')}/checkpoint-2"],
                                              ("is corrupt or truncated",)),
    "corrupt trainer state": (lambda c: ["train", c.config(), f"output.output_dir={damaged(c, 'state')}",
                                         "--resume", "latest"], ("trainer_state.pt is corrupt",)),
    "resume a folder of foreign files": (lambda c: ["train", c.config(), f"output.output_dir={c.root}",
                                                    "--resume", "latest"], ("holds no complete checkpoint",)),
    "resume PATH missing": (lambda c: ["train", c.config(), "--resume", f"{c.root}/checkpoint-9"],
                            ("no such checkpoint folder",)),
    "resume PATH is the output_dir": (lambda c: ["train", c.config(), "--resume", str(c.run_copy())],
                                      ("holds checkpoints: use --resume",)),
    # generate and merge
    "generate: corrupt adapter": (lambda c: ["generate", "--adapter", f"{damaged(c, 'corrupt')}/checkpoint-2", "hi"],
                                  ("is corrupt or truncated",)),
    "merge: truncated adapter": (lambda c: ["merge", "--adapter", f"{damaged(c, 'truncated')}/checkpoint-2",
                                            "--out", f"{c.root}/merged"], ("is corrupt or truncated",)),
    "generate: folder with no adapter": (lambda c: ["generate", "--adapter", str(empty_dir(c, "nothing")), "hi"],
                                         ("holds no adapter",)),
    "merge: folder with no adapter": (lambda c: ["merge", "--adapter", str(empty_dir(c, "nothing")),
                                                 "--out", f"{c.root}/merged"], ("holds no adapter",)),
    "generate: a stopped run's folder": (lambda c: ["generate", "--adapter", str(stopped_run(c)), "hi"],
                                         ("holds no adapter", "it holds checkpoints, e.g.")),
    "merge: --out not empty": (lambda c: ["merge", "--adapter", str(c.run_copy()), "--out", str(c.root)],
                               ("exists and is not empty",)),
    "generate: questions file missing": (lambda c: ["generate", "--adapter", str(c.run_copy()), "--file",
                                                    f"{c.root}/q.jsonl"], ("q.jsonl not found",)),
}


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module", autouse=True)
def _no_progress_bars():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, tmp_path: Path, tiny_qwen2: Path, tiny_llama: Path, trained: Path, capsys):
    build, expected = CASES[name]
    argv = build(Case(tmp_path, tiny_qwen2, tiny_llama, trained))
    before = snapshot(tmp_path)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line.split("\r")[-1] for line in err.splitlines() if line.split("\r")[-1].strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0]
    assert snapshot(tmp_path) == before, "a file of the user's was created, changed or removed"


def test_debug_shows_the_traceback(tmp_path: Path, tiny_qwen2: Path, trained: Path, capsys):
    config = Case(tmp_path, tiny_qwen2, tiny_qwen2, trained).config()
    assert main(["--debug", "train", config, f"data.path={tmp_path}/none.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("none.jsonl not found")


def test_bad_rows_are_skipped_and_counted(tmp_path: Path, tiny_qwen2: Path, trained: Path, capsys):
    c = Case(tmp_path, tiny_qwen2, tiny_qwen2, trained)
    rows = c.rows("rows.jsonl", ROW, {**ROW, "Question": ""}, {**ROW, "Response": 7}, {**ROW, "Complex_CoT": None}, ROW)
    assert main(["data", c.config(), f"data.path={rows}", "--examples", "0"]) == 0
    assert "5 rows read, 2 used, 3 skipped (empty or non-text fields)" in capsys.readouterr().out


ROWS3 = [ROW, {**ROW, "Question": "What is shock?"}, {**ROW, "Question": "Qu'est-ce que la fièvre, « en bref » ?"}]
JSONL3 = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS3)


def _csv(rows: list[dict], end: str = "\n", trailing: str = "", delimiter: str = ",") -> str:
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator=trailing + end, delimiter=delimiter)
    writer.writerow(list(rows[0]))
    writer.writerows([list(r.values()) for r in rows])
    return out.getvalue()


LOADS: dict[str, Callable[[Case], str]] = {
    "JSONL with a UTF-8 BOM (Notepad, Excel)": lambda c: c.file("rows.jsonl", codecs.BOM_UTF8 + JSONL3.encode()),
    "CSV with a UTF-8 BOM": lambda c: c.file("rows.csv", codecs.BOM_UTF8 + _csv(ROWS3).encode()),
    "JSON array with a UTF-8 BOM": lambda c: c.file("rows.json", codecs.BOM_UTF8 + json.dumps(ROWS3).encode()),
    "JSONL with CRLF line ends": lambda c: c.file("rows.jsonl", JSONL3.replace("\n", "\r\n")),
    "CSV with CRLF line ends": lambda c: c.file("rows.csv", _csv(ROWS3, "\r\n")),
    "CSV with trailing commas": lambda c: c.file("rows.csv", _csv(ROWS3, trailing=",")),
    "CSV with ';' separators (Excel in many locales)": lambda c: c.file("rows.csv", _csv(ROWS3, "\r\n", delimiter=";")),
    "CSV with quoted multi-line fields": lambda c: c.file("rows.csv", _csv(
        [ROWS3[0], {**ROWS3[1], "Complex_CoT": "Step 1, low pressure.\nStep 2: poor perfusion."}, ROWS3[2]])),
    "a JSON array in a .jsonl file": lambda c: c.file("rows.jsonl", json.dumps(ROWS3, indent=2)),
    "JSON Lines in a .json file": lambda c: c.file("rows.json", JSONL3),
    "gzip'd JSONL": lambda c: c.file("rows.jsonl.gz", gzip.compress(JSONL3.encode())),
    "gzip'd CSV with a BOM": lambda c: c.file("rows.csv.gz", gzip.compress(codecs.BOM_UTF8 + _csv(ROWS3).encode())),
    "UTF-16 with its byte-order mark (Notepad's 'Unicode')": lambda c: c.file("rows.jsonl", JSONL3.encode("utf-16")),
}


@pytest.mark.parametrize("name", list(LOADS))
def test_real_world_files_load(name: str, tmp_path: Path, tiny_qwen2: Path, trained: Path, capsys):
    c = Case(tmp_path, tiny_qwen2, tiny_qwen2, trained)
    path = LOADS[name](c)
    assert main(["data", c.config(), f"data.path={path}", "--examples", "3"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "3 rows read, 3 used" in out
    assert all(r["Question"] in out for r in ROWS3) and "\ufeff" not in out and "\r" not in out
    assert "format of " in out and "columns (question <- Question" in out


def test_a_200_mb_file_is_streamed(tmp_path: Path):
    """A ~200 MB JSONL file: the first rows come back without reading the rest; all of it loads (~8 s here)."""
    import time

    from thinktune.config import DataConfig
    from thinktune.data import load_samples

    path = tmp_path / "big.jsonl"
    line = json.dumps({**ROW, "Complex_CoT": "Infection with organ dysfunction. " * 30}) + "\n"
    count = 200 * 2**20 // len(line.encode())
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(count // 1000):
            fh.write(line * 1000)
    assert path.stat().st_size > 190 * 2**20
    t0 = time.perf_counter()
    head, report = load_samples(str(path), DataConfig(max_rows=100))
    assert len(head) == 100 and report.rows_read == 100
    assert time.perf_counter() - t0 < 2.0  # streamed: nowhere near the time to parse 200 MB
    samples, report = load_samples(str(path), DataConfig())
    assert len(samples) == report.rows_read == count // 1000 * 1000
    path.unlink()  # pytest keeps recent tmp folders; 200 MB need not stay


@pytest.mark.parametrize("policy, counted", [("truncate", "truncated to max_seq_length"),
                                             ("drop", "dropped (over max_seq_length)")])
def test_overlong_rows_are_counted(policy: str, counted: str, tmp_path: Path, tiny_qwen2: Path, trained: Path, capsys):
    config = Case(tmp_path, tiny_qwen2, tiny_qwen2, trained).config()
    assert main(["data", config, "data.max_rows=12", "data.max_seq_length=460", f"data.overlong={policy}",
                 "--examples", "0"]) == 0
    summary = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sample:en:"))
    assert counted in summary


def test_a_local_run_never_touches_the_network(tmp_path: Path, tiny_qwen2: Path, monkeypatch):
    """HF_HUB_OFFLINE=1, local model and data: train, resume and generate open no connection."""
    attempts: list[object] = []

    def refuse(self, address):
        attempts.append(address)
        raise OSError("network disabled by the test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    assert RunConfig().model.trust_remote_code is False
    out = tmp_path / "out"
    cfg = tiny_config(tiny_qwen2, out, data={"max_rows": 4, "max_seq_length": 320},
                      train={"max_steps": 1, "grad_accum": 1})
    train(cfg, log=lambda _: None)
    cfg.train.max_steps = 2
    train(cfg, resume="latest", log=lambda _: None)
    assert main(["generate", "--adapter", str(out), "--max-new-tokens", "2", "--no-stream", "hi"]) == 0
    assert attempts == []
