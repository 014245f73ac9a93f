"""Prompt record: the run's prompt format, carried along with merged and exported models.

A merged folder (and the GGUF made from it) must be prompted exactly as the adapter was
trained, or it answers differently. `merge` writes `thinktune.json` (the template name) beside
the weights; `generate`, `serve` and `export` read it back. For tools that do not read that
file, the format is also written as a chat template (Jinja, for transformers and llama.cpp)
and as an Ollama TEMPLATE (Go template). Both are cut out of `PromptFormat.prompt()` itself
(rendered around a marker), so there is one renderer and the copies cannot drift from it.
This module never loads a model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from thinktune.checkpoint import read_run_config
from thinktune.data import THINK_OPEN, PromptFormat
from thinktune.errors import UserError

RECORD_FILE = "thinktune.json"
DEFAULT_TEMPLATE = "seed-zh"
_MARK = "\u0000QUESTION\u0000"


def write_record(folder: str | Path, template: str, **extra: Any) -> Path:
    """Write `folder/thinktune.json` with the template name (and where the model came from)."""
    path = Path(folder) / RECORD_FILE
    path.write_text(json.dumps({"template": template, **extra}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_record(folder: str | Path | None) -> dict[str, Any] | None:
    """The record of a merged folder, or None (no folder, a hub id, or a folder thinktune did not write)."""
    if not folder:
        return None
    path = Path(folder).expanduser()
    if path.is_file() and path.suffix == ".gguf":  # thinktune export writes the name into the file's metadata
        return _gguf_record(path)
    file = path / RECORD_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{file} is not valid JSON; delete it or pass --template") from None
    if not isinstance(data, dict) or not isinstance(data.get("template"), str):
        raise UserError(f"{file} has no 'template'; pass --template")
    return data


def _gguf_record(path: Path) -> dict[str, Any] | None:
    import gguf

    from thinktune.gguf_export import GGUF_TEMPLATE_KEY

    field = gguf.GGUFReader(path).get_field(GGUF_TEMPLATE_KEY)
    return {"template": field.contents()} if field is not None else None


def resolve_template(adapter: str | Path | None, base: str | Path | None, template: str | None) -> tuple[str, str]:
    """(template, where it came from): --template, else the adapter's run config, else the base's record."""
    if template:
        return template, "--template"
    run = read_run_config(Path(adapter)) if adapter else None
    if run is not None:
        return run["data"]["template"], f"the run config in {adapter}"
    record = read_record(base)
    if record:
        path = Path(base).expanduser()  # type: ignore[arg-type]
        return record["template"], f"{path}'s metadata" if path.suffix == ".gguf" else f"{path / RECORD_FILE}"

    return DEFAULT_TEMPLATE, "the default (no run config or thinktune.json found)"


def prompt_parts(fmt: PromptFormat) -> tuple[str, str]:
    """(text before the question, text after it) of the inference prompt; the latter ends in '<think>\\n'."""
    rendered = fmt.prompt(_MARK)
    if rendered.count(_MARK) != 1:
        raise UserError(f"template {fmt.template}: the prompt does not contain the question exactly once")
    prefix, suffix = rendered.split(_MARK)
    return prefix, suffix


def chat_template(fmt: PromptFormat) -> str:
    """A Jinja chat template that renders the training prompt for the last user message.

    With `add_generation_prompt` it ends in the '<think>\\n' prefill, as in training. For the
    `chat` template the tokenizer's own template is kept (multi-turn, system prompts) and the
    prefill is appended when that template does not open the thinking block itself.
    """
    if fmt.template == "chat":
        own = fmt.tokenizer.chat_template
        probe = fmt.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                  add_generation_prompt=True)
        if probe.rstrip("\n").endswith(THINK_OPEN):
            return own
        return own + "{%- if add_generation_prompt %}{{- " + json.dumps(THINK_OPEN + "\n") + " }}{%- endif %}"
    prefix, suffix = prompt_parts(fmt)
    return (
        "{%- set ns = namespace(question='') -%}"
        "{%- for message in messages -%}{%- if message['role'] == 'user' -%}"
        "{%- set ns.question = message['content'] -%}{%- endif -%}{%- endfor -%}"
        "{{- " + json.dumps(prefix, ensure_ascii=False) + " -}}{{- ns.question -}}"
        "{%- if add_generation_prompt -%}{{- " + json.dumps(suffix, ensure_ascii=False) + " -}}"
        "{%- else -%}{{- " + json.dumps(suffix.removesuffix(THINK_OPEN + "\n"), ensure_ascii=False) + " -}}"
        "{%- endif -%}"
    )


def ollama_template(fmt: PromptFormat) -> str:
    """An Ollama TEMPLATE (Go text/template) for one question: the training prompt around `.Prompt`."""
    prefix, suffix = prompt_parts(fmt)
    for part in (prefix, suffix):
        if "{{" in part or '"""' in part:
            raise UserError(f"template {fmt.template}: the prompt contains '{{{{' or '\"\"\"', which an Ollama "
                            f"Modelfile cannot hold; write the TEMPLATE by hand")
    return prefix + "{{ .Prompt }}" + suffix
