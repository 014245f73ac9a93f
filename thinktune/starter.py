"""Configs a user can start from: `thinktune init NAME [PATH]` and `thinktune validate [CONFIG] [--explain]`.

`init` writes a shipped config (or any config file) as YAML with each key's docstring as a comment above it,
for the user to edit; the file loads to exactly the same config. `validate CONFIG --explain` lists every key
with CONFIG's value and its meaning, marking the keys the config sets; `validate CONFIG` checks the keys
(`config.load_config`) and then what can be checked before loading (`checks.check_before_loading`: data files,
model folder, 4-bit without CUDA; a hub id neither cached nor reachable is a warning) and prints the resolved config.
This module reads YAML and writes the one file `init` is asked for; it never loads a model or data.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any

import yaml

from thinktune.config import RunConfig, apply_overrides, explain, field_docs, load_config, resolve_config_path
from thinktune.errors import UserError

WIDTH = 100


def yaml_value(value: Any) -> str:
    """One value as inline YAML (lists in brackets, null, 2.0e-3 as written by PyYAML)."""
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip().removesuffix("...").strip()


def comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(" ".join(text.split()), WIDTH - len(indent) - 2)] if text else []


def raw_config(path: str | Path, overrides: list[str] | None = None) -> tuple[Path, dict[str, Any]]:
    """The config file's own keys (plus overrides), as written: which keys a config sets."""
    file = resolve_config_path(path)
    raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    return file, apply_overrides(raw, list(overrides or []))


def sections() -> list[tuple[str, type, str]]:
    hints = typing.get_type_hints(RunConfig)
    docs = field_docs(RunConfig)
    return [(f.name, hints[f.name], docs.get(f.name, "")) for f in dataclasses.fields(RunConfig)]


def header_comments(file: Path) -> list[str]:
    lines = []
    for line in file.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def commented_yaml(path: str | Path) -> str:
    """The config at `path` as YAML with each key's docstring as a comment (what `thinktune init` writes)."""
    file, raw = raw_config(path)
    load_config(file)  # a config that does not load is not a starting point
    lines = header_comments(file) + [
        f"# Written by `thinktune init` from {file.name}. Keys not listed keep their defaults; "
        f"`thinktune validate --explain` lists them all.",
        "",
    ]
    for name, cls, doc in sections():
        if name not in raw:
            continue
        docs = field_docs(cls)
        lines += comment(doc, "") + [f"{name}:"]
        for key, value in (raw[name] or {}).items():
            lines += comment(docs.get(key, ""), "  ") + [f"  {key}: {yaml_value(value)}"]
        lines.append("")
    return "\n".join(lines)


def explain_config(path: str | Path, overrides: list[str] | None = None) -> str:
    """Every key with CONFIG's value and meaning; keys the config (or an override) sets are marked."""
    cfg = load_config(path, overrides)
    file, raw = raw_config(path, overrides)
    values = cfg.to_dict()
    lines = [f"# {file}: every key, its value in this config and its meaning ('# set' = set by the config or an "
             f"override; the rest are defaults)"]
    for name, cls, doc in sections():
        lines += comment(doc, "") + [f"{name}:"]
        docs = field_docs(cls)
        given = raw.get(name) or {}
        for f in dataclasses.fields(cls):
            mark = "  # set" if f.name in given else ""
            lines += comment(docs.get(f.name, ""), "  ") + [f"  {f.name}: {yaml_value(values[name][f.name])}{mark}"]
    return "\n".join(lines)


def validate_command(args: Any) -> int:
    """`thinktune validate CONFIG [overrides]` / `--explain [CONFIG]`."""
    from thinktune.checks import check_before_loading, hub_problems

    if args.explain:
        print(explain_config(args.config, args.overrides) if args.config else explain())
        return 0
    if not args.config:
        raise UserError("validate needs a CONFIG (or --explain)")
    cfg = load_config(args.config, args.overrides)
    check_before_loading(cfg, str(args.config), hub=False)  # a config may be written here and run elsewhere:
    for problem in hub_problems(cfg):                        # the hub is only a warning
        print(f"warning: {problem}", file=sys.stderr)
    print(json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False))
    print(f"{args.config}: valid (keys, data files, model and device checked; nothing loaded)", file=sys.stderr)
    return 0


def init_command(args: Any) -> int:
    """`thinktune init NAME [PATH] [--force]`: write NAME's config as commented YAML to PATH."""
    target = Path(args.path or f"{Path(args.name).stem}.yaml")
    if target.is_dir():
        target = target / f"{Path(args.name).stem}.yaml"
    if target.exists() and not args.force:
        raise UserError(f"{target} exists; pass --force to replace it, or give another PATH")
    text = commented_yaml(args.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    print(f"wrote {target}: edit it, then `thinktune validate {target}` and `thinktune train {target}`")
    return 0
