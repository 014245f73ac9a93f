"""trust_remote_code comes from the user only: an adapter folder that asks for it cannot switch it on.

The folder is what a user downloads: a real trained adapter whose saved run config says
model.trust_remote_code=true and whose tokenizer names its own Python class (auto_map). The
class's module writes a file when imported, so the test sees whether the folder's code ran.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import tiny_config
from thinktune.cli import main
from thinktune.errors import UserError
from thinktune.export import adapter_base_config, load_with_adapter
from thinktune.loop import train

TOKENIZER_CODE = '''
import os
from transformers import PreTrainedTokenizerFast

with open(os.environ["THINKTUNE_SENTINEL"], "a", encoding="utf-8") as fh:
    fh.write("the adapter folder's code ran\\n")


class FolderTokenizer(PreTrainedTokenizerFast):
    pass
'''


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    train(tiny_config(tiny_llama, out, train={"max_steps": 2, "save_steps": 2}), log=lambda _: None)
    return out


def asking_folder(trained: Path, dest: Path, config_name: str) -> Path:
    """A copy of the adapter whose saved config and tokenizer ask for trust_remote_code."""
    shutil.copytree(trained / "checkpoint-2", dest)
    saved = json.loads(next((dest / n) for n in ("thinktune_config.json", "config.json") if (dest / n).is_file()).read_text())
    for name in ("thinktune_config.json", "config.json"):
        (dest / name).unlink(missing_ok=True)
    saved["model"]["trust_remote_code"] = True
    (dest / config_name).write_text(json.dumps(saved))
    (dest / "folder_tokenizer.py").write_text(TOKENIZER_CODE)
    tok_cfg = json.loads((dest / "tokenizer_config.json").read_text())
    tok_cfg.update(tokenizer_class="FolderTokenizer", auto_map={"AutoTokenizer": [None, "folder_tokenizer.FolderTokenizer"]})
    (dest / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return dest


@pytest.fixture
def sentinel(tmp_path: Path, monkeypatch) -> Path:
    path = tmp_path / "code-ran.txt"
    monkeypatch.setenv("THINKTUNE_SENTINEL", str(path))
    return path


@pytest.mark.parametrize("config_name", ["thinktune_config.json", "config.json"])  # this run's name, and older runs'
def test_saved_config_never_switches_trust_on(trained: Path, tmp_path: Path, sentinel: Path, config_name: str):
    folder = asking_folder(trained, tmp_path / "downloaded", config_name)
    assert adapter_base_config(folder).trust_remote_code is False
    with pytest.raises(UserError, match="needs its own Python code.*--trust-remote-code"):
        load_with_adapter(folder)
    assert not sentinel.exists()


def test_generate_merge_eval_refuse_without_the_flag(trained: Path, tmp_path: Path, sentinel: Path, capsys):
    folder = asking_folder(trained, tmp_path / "downloaded", "thinktune_config.json")
    assert main(["generate", "--adapter", str(folder), "--max-new-tokens", "2", "Why?"]) == 2
    assert main(["merge", "--adapter", str(folder), "--out", str(tmp_path / "merged")]) == 2
    assert main(["eval", "--adapter", str(folder), "--data", "sample:en", "--n", "2", "--loss-only", "--no-base",
                 "--out", str(tmp_path / "eval.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("--trust-remote-code") == 3 and "Traceback" not in err
    assert not sentinel.exists() and not (tmp_path / "merged").exists() and not (tmp_path / "eval.json").exists()


def test_the_users_flag_does_allow_it(trained: Path, tmp_path: Path, sentinel: Path, capsys):
    folder = asking_folder(trained, tmp_path / "allowed", "thinktune_config.json")
    assert main(["generate", "--adapter", str(folder), "--max-new-tokens", "2", "--trust-remote-code", "Why?"]) == 0
    assert sentinel.read_text().startswith("the adapter folder's code ran")
