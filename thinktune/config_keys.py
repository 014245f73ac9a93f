"""Config keys from the tools users come from (HF Trainer, TRL, PEFT, Unsloth), and where a key sits in a YAML file.

`normalize(raw)` runs before the typed build: a key whose meaning is identical to a
thinktune key (`learning_rate` = `train.lr`) is renamed into its section, whether it is
written flat at the top (as TRL's configs are) or in the section; `bf16: true` /
`fp16: true` become `train.precision`. A key whose meaning differs (`max_seq_length`
under `model`, `optim`, `lr_scheduler_type`) is left for the build to reject, and
`hint(key)` names the thinktune key in that error. `key_lines(text)` maps each dotted
key of a YAML document to its line number. This module never validates values.
"""
from __future__ import annotations

from typing import Any

import yaml

from thinktune.errors import UserError

# other tool's key -> thinktune's dotted key, where the meaning is the same (accepted)
ALIASES: dict[str, str] = {
    "learning_rate": "train.lr",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "num_train_epochs": "train.epochs",
    "warmup_ratio": "train.warmup_steps",  # thinktune's warmup_steps below 1 is a ratio (as transformers 5)
    "warmup_steps": "train.warmup_steps",
    "max_steps": "train.max_steps",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "logging_steps": "train.logging_steps",
    "save_steps": "train.save_steps",
    "save_total_limit": "train.save_total_limit",
    "eval_steps": "train.eval_steps",
    "seed": "train.seed",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "model_name": "model.name_or_path",
    "model_name_or_path": "model.name_or_path",
    "load_in_4bit": "model.load_in_4bit",
    "load_in_8bit": "model.load_in_8bit",
    "trust_remote_code": "model.trust_remote_code",
    "output_dir": "output.output_dir",
}
# keys whose thinktune counterpart differs in place or meaning: the error names it (not accepted)
HINTS: dict[str, str] = {
    "bf16": "train.precision: bf16",
    "fp16": "train.precision: fp16",
    "tf32": "nothing (TF32 matmuls follow torch's defaults)",
    "max_seq_length": "data.max_seq_length",
    "max_length": "data.max_seq_length",
    "optim": "train.optimizer (adamw or adamw_8bit)",
    "lr_scheduler_type": "train.schedule (linear, cosine or constant)",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "use_gradient_checkpointing": "train.gradient_checkpointing",
    "packing": "train.packing",
    "torch_dtype": "model.dtype",
    "dataset_name": "data.path",
    "dataset_text_field": "data.question_column / data.cot_column / data.response_column",
    "r": "lora.r",
    "rank": "lora.r",
    "alpha": "lora.alpha",
    "target_modules": "lora.target_modules",
    "use_rslora": "lora.use_rslora",
    "use_dora": "lora.use_dora",
    "report_to": "output.tensorboard",
    "overwrite_output_dir": "output.overwrite",
}
SECTIONS = ("model", "lora", "data", "train", "output")


def normalize(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Move identical-meaning keys of other tools to their thinktune place; refuse one set twice.

    Returns the new tree and {thinktune key: where it was written} for the keys moved.
    """
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) and k in SECTIONS else v) for k, v in raw.items()}
    moves: list[tuple[str, str, Any]] = []  # (where it was written, thinktune key, value)
    for key, value in raw.items():
        if key in ALIASES:
            moves.append((key, ALIASES[key], value))
            del out[key]
        elif key in ("bf16", "fp16") and value is True:
            moves.append((key, "train.precision", key))
            del out[key]
        elif key in SECTIONS and isinstance(value, dict):
            for sub, sub_value in value.items():
                target = ALIASES.get(sub)
                if target and target != f"{key}.{sub}":
                    moves.append((f"{key}.{sub}", target, sub_value))
                    del out[key][sub]
                elif key == "train" and sub in ("bf16", "fp16") and sub_value is True:
                    moves.append((f"{key}.{sub}", "train.precision", sub))
                    del out[key][sub]
    moved: dict[str, str] = {}
    for written, target, value in moves:
        section, name = target.split(".")
        node = out.setdefault(section, {})
        if not isinstance(node, dict):
            continue  # the build reports the section itself
        if written.endswith("warmup_ratio") and isinstance(value, (int, float)) and not 0 <= value < 1:
            raise UserError(f"{written} = {value} is not a share of the steps below 1 (thinktune's key is train.warmup_steps)")
        if name in node and not (written.endswith("warmup_ratio") and node[name] == 0):  # HF: warmup_steps 0 = use the ratio
            raise UserError(f"{written} and {target} are both set (they mean the same); keep one")
        node[name] = value
        moved[target] = written
    return out, moved


def canonical(dotted: str) -> str:
    """The thinktune key for a dotted key written with another tool's name ('train.learning_rate' -> 'train.lr')."""
    name = dotted.split(".")[-1]
    return ALIASES.get(name, dotted) if ALIASES.get(name) != dotted else dotted


def hint(key: str, dotted: str) -> str:
    """' (thinktune's key is X)' for a key other tools use, else ''."""
    target = HINTS.get(key) or ALIASES.get(key)
    if not target or target.split(":")[0].split(" ")[0] == dotted:
        return ""
    return f" (thinktune's key is {target})"


def key_lines(text: str) -> dict[str, int]:
    """Dotted key -> 1-based line of a YAML mapping document (empty when it does not parse as one)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    lines: dict[str, int] = {}

    def walk(mapping: Any, prefix: str) -> None:
        if not isinstance(mapping, yaml.MappingNode):
            return
        for key_node, value_node in mapping.value:
            dotted = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            lines[dotted] = key_node.start_mark.line + 1
            walk(value_node, dotted)

    walk(node, "")
    return lines
