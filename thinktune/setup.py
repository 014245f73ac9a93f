"""Setup: turn a RunConfig into a `Run` — tokenizer, data splits, model with adapters, fast path.

`prepare(cfg)` reads the data first (data errors surface before the slow model load), loads the
base, attaches the adapters and, where it is exact, the fast path with its memory plan
(`prepare_model`); `build_optimizer` makes the optimizer over the adapters. The objective and the
step are built by the loop from these parts. `preview_data` is `thinktune data`.
This module never runs a forward or a step and never writes files.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from thinktune.config import RunConfig
from thinktune.data import DataReport, Example, PromptFormat, build_examples, load_splits
from thinktune.errors import UserError
from thinktune.fastpath import FastPath, apply_fast_path, compile_layers, fast_path_supported, lora_layer_mapping
from thinktune.lora import attach_lora
from thinktune.memory.planner import MemoryPlan, plan_memory
from thinktune.memory.shapes import ModelShape
from thinktune.model import ModelSource, load_base_model, load_tokenizer, model_summary, pick_device, resolve_source


@dataclass
class Run:
    """Everything the loop needs, built once by `prepare`."""

    cfg: RunConfig
    source: ModelSource
    tokenizer: Any
    fmt: PromptFormat
    train_examples: list[Example]
    eval_examples: list[Example]
    reports: list[DataReport]
    model: Any
    device: torch.device
    fast: FastPath | None = None
    """What the fast path changed (None: the plain PEFT path)."""


def prepare(cfg: RunConfig, log: Callable[[str], None] = print) -> Run:
    """Load tokenizer, data and model; attach adapters. Data errors surface before the model loads."""
    source = resolve_source(cfg.model)
    tokenizer = load_tokenizer(source, cfg.model.trust_remote_code)
    fmt = PromptFormat(cfg.data.template, tokenizer)
    splits = load_splits(cfg.data, cfg.train.seed)
    assert splits.train_report is not None
    reports = [splits.train_report] + ([splits.eval_report] if splits.eval_kind == "file" else [])
    train_examples = build_examples(splits.train, fmt, tokenizer, cfg.data, splits.train_report)
    eval_examples = build_examples(splits.eval, fmt, tokenizer, cfg.data, splits.eval_report) if splits.eval else []
    for r in reports:
        log(r.summary())
    model = load_base_model(cfg.model, source)
    device = pick_device(cfg.model)
    model, fast = prepare_model(cfg, model, device, log)
    log(model_summary(model))
    return Run(cfg, source, tokenizer, fmt, train_examples, eval_examples, reports, model, device, fast)


def prepare_model(cfg: RunConfig, model: Any, device: torch.device, log: Callable[[str], None] = print,
                  memory_budget_bytes: int | None = None) -> tuple[Any, FastPath | None]:
    """Attach the adapters; on the fast path also swap in the fused modules and apply the memory plan.

    The fast path runs when train.fast_path is "on", or "auto" and `fast_path_supported` says its
    modules are exact for this architecture and `LoraConfig.fast_path_obstacle` finds nothing in
    the adapters' settings (decided here once: the report and the memory plan follow it). `memory_budget_bytes` (default: the GPU's memory)
    is what train.gradient_checkpointing=auto plans for.
    """
    supported, why = fast_path_supported(model)
    obstacle = cfg.lora.fast_path_obstacle()
    if supported and obstacle is not None:
        supported, why = False, obstacle
    if cfg.train.fast_path == "on" and not supported:
        raise UserError(f"train.fast_path=on, but the fast path does not fit this run: {why}; use auto or off")
    gc = cfg.train.gradient_checkpointing
    if cfg.train.fast_path == "off" or not supported:
        if cfg.train.fast_path == "auto" and obstacle is not None:
            log(f"notice: {obstacle}: the LoRA layers run PEFT's own forward (the plain path)")
        checkpointing = gc is True or (gc == "auto" and device.type == "cuda")
        return attach_lora(model, cfg.lora, cfg.train.seed, checkpointing), None
    model = attach_lora(model, cfg.lora, cfg.train.seed, False, custom_modules=lora_layer_mapping())
    plan = memory_plan(cfg, model, device, memory_budget_bytes)
    fast = apply_fast_path(model, plan, device, fused_mlp=cfg.lora.dropout == 0)
    # auto: where compiling was measured faster: one CUDA process, no layer recomputed
    measured = device.type == "cuda" and plan.checkpointed_layers == 0 and os.environ.get("WORLD_SIZE", "1") == "1"
    if cfg.train.compile is True or (cfg.train.compile == "auto" and measured):
        fast.compiled_layers = compile_layers(model)
    return model, fast


def memory_plan(cfg: RunConfig, model: Any, device: torch.device, budget_bytes: int | None = None) -> MemoryPlan:
    """How many layers the fast path recomputes (train.gradient_checkpointing: true, false or auto)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    gc = cfg.train.gradient_checkpointing
    if device.type != "cuda":  # nothing to fit on the CPU: auto keeps every activation
        return MemoryPlan(config.num_hidden_layers if gc is True else 0, config.num_hidden_layers)
    embedding, head = base.get_input_embeddings(), base.get_output_embeddings()
    movable = isinstance(embedding, torch.nn.Embedding) and (head is None or head.weight is not embedding.weight)
    embedding_bytes = embedding.weight.numel() * embedding.weight.element_size() if movable else 0
    quantized = bool(getattr(base, "is_loaded_in_4bit", False))
    shape = ModelShape.from_config(config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    static = torch.cuda.memory_allocated(device) + trainable * (4 + 8)  # + gradients and two AdamW moments
    if budget_bytes is None:
        free, _total = torch.cuda.mem_get_info(device)
        budget_bytes = free + torch.cuda.memory_reserved(device)
    tokens = cfg.train.batch_size * cfg.data.max_seq_length
    return plan_memory(shape, tokens, static, budget_bytes, gc, quantized, embedding_bytes, cfg.lora)


def build_optimizer(params: list[torch.nn.Parameter], cfg: RunConfig, device: torch.device,
                    log: Callable[[str], None] = print) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes 8-bit AdamW on CUDA; biases get no weight decay."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if cfg.train.optimizer == "adamw_8bit":
        if device.type == "cuda":
            try:
                import bitsandbytes as bnb

                return bnb.optim.AdamW8bit(groups, lr=cfg.train.lr)
            except ImportError:
                log("notice: bitsandbytes is not installed; using torch AdamW instead of adamw_8bit")
        else:
            log("notice: adamw_8bit needs CUDA (bitsandbytes); using torch AdamW on CPU")
    return torch.optim.AdamW(groups, lr=cfg.train.lr, fused=device.type == "cuda")


def preview_data(args: argparse.Namespace) -> int:
    """`thinktune data`: formatted examples with the loss span marked, token-length statistics, histogram."""
    from thinktune.config import load_config
    from thinktune.data import length_histogram, load_samples, render_loss_span

    from thinktune.checks import check_before_loading

    cfg = load_config(args.config, args.overrides)
    check_before_loading(cfg, args.config, device=False)
    tokenizer = load_tokenizer(resolve_source(cfg.model), cfg.model.trust_remote_code)
    fmt = PromptFormat(cfg.data.template, tokenizer)
    samples, report = load_samples(cfg.data.path, cfg.data)
    examples = build_examples(samples, fmt, tokenizer, cfg.data, report)
    for i, ex in enumerate(examples[: args.examples]):
        print(f"----- example {i + 1} (loss on [[LOSS> ... <LOSS]], {ex.num_target_tokens}/{len(ex.input_ids)} tokens) -----")
        print(render_loss_span(ex, tokenizer))
    print("----- statistics -----")
    print(report.summary())
    stats = report.length_stats()
    print("token lengths: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    print(f"max_seq_length {cfg.data.max_seq_length}, overlong policy: {cfg.data.overlong}, train_on: {cfg.data.train_on}")
    print(length_histogram(report.lengths))
    return 0
