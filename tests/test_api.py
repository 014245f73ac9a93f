"""The Python API a notebook uses: typed functions, nothing printed unless asked, the model kept between calls,
and the README's notebook example run exactly as written (slow: the real demo model)."""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import thinktune
from conftest import tiny_config
from thinktune.loop import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_qwen2) -> Path:
    out = tmp_path_factory.mktemp("api") / "run"
    train(tiny_config(tiny_qwen2, out, data={"eval_path": "sample:en-test"}, train={"max_steps": 3, "lr": 5e-3}),
          log=lambda _: None)
    return out


def test_signatures_are_typed_without_kwargs():
    for name in ("train", "load", "generate", "evaluate", "merge", "plot", "report"):
        sig = inspect.signature(getattr(thinktune, name))
        assert all(p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in sig.parameters.values()), name
        assert all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values()), name
        assert sig.return_annotation is not inspect.Signature.empty, name


def test_generate_is_quiet_and_keeps_the_model(trained: Path, capsys):
    thinktune._loaded.clear()
    one = thinktune.generate("What is sepsis?", adapter=trained, max_new_tokens=6)
    assert isinstance(one, dict) and {"thinking", "answer", "text", "new_tokens"} <= set(one)
    loaded = next(iter(thinktune._loaded.values()))
    two = thinktune.generate(["What is sepsis?", "What is gout?"], adapter=trained, max_new_tokens=6)
    assert next(iter(thinktune._loaded.values())) is loaded  # not loaded again
    assert [a["question"] for a in two] == ["What is sepsis?", "What is gout?"] and two[0]["text"] == one["text"]
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""  # nothing printed unless asked
    thinktune.generate("What is sepsis?", adapter=trained, max_new_tokens=6, show=True)
    assert "[thinking]" in capsys.readouterr().out


def test_model_object_compare_and_the_other_api_calls(trained: Path, tmp_path: Path, capsys):
    model = thinktune.load(adapter=trained)
    assert "Model(adapter=" in repr(model)
    pair = model.generate("What is sepsis?", max_new_tokens=6, compare=True)
    assert set(pair) == {"question", "base", "tuned"}
    result = thinktune.evaluate(adapter=trained, n=2, max_new_tokens=6)
    assert set(result["models"]) == {"base", "tuned"} and result["rows"] == 2
    assert result["models"]["tuned"]["loss"] != result["models"]["base"]["loss"]
    (trained / "eval.json").write_text(__import__("json").dumps(result))
    assert {p.name for p in thinktune.plot(trained)} >= {"loss.png", "lr.png"}
    assert thinktune.report(trained).name == "report.html"
    merged = thinktune.merge(trained, tmp_path / "merged", dtype="fp32")
    assert (merged / "config.json").is_file()
    assert capsys.readouterr().out == ""


def readme_notebook_block() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("From a notebook"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_notebook_example_runs_as_written(tmp_path: Path):
    """The README's python block, in a fresh folder, with only the step count and the eval size made small."""
    code = readme_notebook_block()
    small = {'"train.max_steps=24"': '"train.max_steps=2"',
             'thinktune.evaluate(adapter="my-first-run")': 'thinktune.evaluate(adapter="my-first-run", n=2, max_new_tokens=8)',
             'model.generate("What is the first-line drug for type 2 diabetes?")':
                 'model.generate("What is the first-line drug for type 2 diabetes?", max_new_tokens=16)'}
    for old, new in small.items():
        assert old in code, f"the README's notebook block changed: update this test ({old})"
        code = code.replace(old, new)
    script = tmp_path / "notebook.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "my-first-run" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "my-first-run" / "report.html").is_file()
    assert "->" in proc.stdout  # the printed base -> tuned loss
