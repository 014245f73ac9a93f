"""Export: find the base of an adapter folder, load base + adapter, merge into a 16-bit model.

`merge(adapter_dir, out_dir)` writes safetensors + config + tokenizer that
`AutoModelForCausalLM.from_pretrained(out_dir)` loads and that gives the same greedy
tokens as base + adapter. It refuses to write into a folder that holds files.
Whether a model's or tokenizer's own Python code may run (`trust_remote_code`) is
the caller's argument, i.e. the user's flag or YAML, never a setting read from the
adapter folder: a downloaded folder must not be able to switch it on.
This module never trains.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from thinktune.checkpoint import check_safetensors, read_run_config
from thinktune.config import ModelConfig, config_from_dict
from thinktune.errors import UserError
from thinktune.model import DTYPES, ModelSource, load_base_model, load_tokenizer, resolve_source


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    folder = Path(adapter_dir).expanduser()
    if not folder.is_dir():
        raise UserError(f"adapter folder {folder} not found")
    if not (folder / "adapter_config.json").is_file():
        hint = ""
        ckpts = sorted(folder.glob("checkpoint-*/adapter_config.json"))
        if ckpts:
            hint = f"; it holds checkpoints, e.g. {ckpts[-1].parent}"
        raise UserError(f"{folder} holds no adapter (no adapter_config.json){hint}")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{folder} has adapter_config.json but no adapter_model.safetensors")
    check_safetensors(weights, "re-export or use another checkpoint")
    return folder


def adapter_base_config(adapter_dir: Path, base: str | None = None, overrides: dict[str, Any] | None = None,
                        trust_remote_code: bool = False) -> ModelConfig:
    """The ModelConfig the adapter was trained with (its saved run config), or from adapter_config.json.

    `trust_remote_code` is the user's choice; the saved run config's value is ignored.
    """
    saved = read_run_config(adapter_dir)
    if saved is not None:
        model_cfg = config_from_dict({"model": saved.get("model", {})}).model
    else:
        peft_cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
        name = peft_cfg.get("base_model_name_or_path")
        if not name and not base:
            raise UserError(f"{adapter_dir}: the adapter does not name its base model; pass --base")
        model_cfg = ModelConfig(name_or_path=name or "")
    if base:
        model_cfg.name_or_path, model_cfg.gguf_file = base, None
    for key, value in (overrides or {}).items():
        setattr(model_cfg, key, value)
    model_cfg.trust_remote_code = trust_remote_code
    return model_cfg


def load_with_adapter(adapter_dir: str | Path | None, base: str | None = None,
                      overrides: dict[str, Any] | None = None,
                      trust_remote_code: bool = False, dequantize_base: bool = False) -> tuple[Any, Any, ModelConfig]:
    """(model, tokenizer, model config): base alone, or base + adapter as a PeftModel in eval mode.

    trust_remote_code: let the base model's and the tokenizer's own Python code run; only the
    user sets it (`--trust-remote-code`, model.trust_remote_code in their YAML).
    dequantize_base: load a 4-bit/8-bit base as configured, then dequantise it (bitsandbytes' own
    dequantisation through transformers) before the adapter goes on, so a merge adds the adapter to
    the very weights it was trained against.
    """
    if adapter_dir is None:
        if not base:
            raise UserError("give --adapter DIR or --base MODEL")
        model_cfg = ModelConfig(name_or_path=base)
        for key, value in (overrides or {}).items():
            setattr(model_cfg, key, value)
        model_cfg.trust_remote_code = trust_remote_code
        source = resolve_source(model_cfg)
        tokenizer = load_tokenizer(source, model_cfg.trust_remote_code)
        model = load_base_model(model_cfg, source)
        return model.eval(), tokenizer, model_cfg
    from peft import PeftModel

    folder = check_adapter_dir(adapter_dir)
    model_cfg = adapter_base_config(folder, base, overrides, trust_remote_code)
    source = resolve_source(model_cfg)
    tok_source = ModelSource(str(folder)) if (folder / "tokenizer_config.json").is_file() else source
    tokenizer = load_tokenizer(tok_source, model_cfg.trust_remote_code)
    model = load_base_model(model_cfg, source)
    if dequantize_base and getattr(model, "is_quantized", False):
        model = model.dequantize()
    try:
        model = PeftModel.from_pretrained(model, str(folder))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f"{folder} does not fit base model {model_cfg.name_or_path}: {str(exc).splitlines()[0][:200]}") from None
    return model.eval(), tokenizer, model_cfg


MERGE_LOAD = {"load_in_4bit": False, "load_in_8bit": False, "dtype": "fp32", "device": "cpu"}
"""How merge loads a 16-bit run's base: full precision on the host, whatever the machine has (see `merge`)."""


def merge(adapter_dir: str | Path, out_dir: str | Path, dtype: str = "bf16", base: str | None = None,
          template: str | None = None, log: Any = print, trust_remote_code: bool = False) -> Path:
    """Merge the adapter into a full-precision copy of its base, then save the result in `dtype` (bf16 by default).

    W + scale * B @ A is computed in fp32 and rounded to `dtype` once, on the host, so the merged
    weights are the same on a GPU machine and a CPU one (host memory: 4 bytes per base parameter,
    about 30 GB for a 7B model). A 4-bit (QLoRA) run is merged into its base as it was trained,
    4-bit and dequantised, which needs a CUDA GPU; without one the full-precision base is used.
    The run's prompt template goes with it: `thinktune.json` names it and the tokenizer's chat
    template renders it (see thinktune.prompt_record).
    """
    import torch

    from thinktune.data import PromptFormat
    from thinktune.prompt_record import chat_template, resolve_template, write_record

    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; choose a new folder (nothing was written)")
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    folder = check_adapter_dir(adapter_dir)
    name, where = resolve_template(folder, base, template)
    trained_4bit = adapter_base_config(folder, base).load_in_4bit
    if trained_4bit and torch.cuda.is_available():
        log("4-bit run: merging into the dequantised 4-bit base (the weights the adapter was trained against)")
        model, tokenizer, _ = load_with_adapter(folder, base, {"dtype": dtype}, trust_remote_code, dequantize_base=True)
    else:
        if trained_4bit:
            log("4-bit run on a machine without CUDA: merging into the full-precision base (dequantising the "
                "4-bit base needs bitsandbytes on a GPU)")
        model, tokenizer, _ = load_with_adapter(folder, base, MERGE_LOAD, trust_remote_code)
    merged = model.merge_and_unload()
    merged = merged.to(DTYPES[dtype])
    merged.config.use_cache = True
    fmt = PromptFormat(name, tokenizer)
    tokenizer.chat_template = chat_template(fmt)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    write_record(tmp, name, adapter=str(folder.resolve()), template_from=where)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    log(f"prompt template: {name} (from {where}); recorded in {out / 'thinktune.json'} and the tokenizer's chat template")
    return out


def merge_command(args: Any) -> int:
    """`thinktune merge --adapter DIR --out DIR [--dtype bf16|fp16|fp32] [--base MODEL]`."""
    out = merge(args.adapter, args.out, dtype=args.dtype, base=args.base, trust_remote_code=args.trust_remote_code)
    print(f"merged model written to {out} (load it with AutoModelForCausalLM.from_pretrained('{out}'))")
    return 0
