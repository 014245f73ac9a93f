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
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from thinktune.config import RunConfig
from thinktune.data import DataReport, Example, PromptFormat, build_examples, load_splits
from thinktune.errors import UserError
from thinktune.fastpath import FastPath, apply_fast_path, compile_layers, fast_path_supported, lora_layer_mapping
from thinktune.kernels import liger_available
from thinktune.lora import attach_lora
from thinktune.rl.problems import Problem, load_problem_splits
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
    train_problems: list[Problem] = field(default_factory=list)
    """train.objective=grpo: the verifiable problems to sample on (train_examples is then empty)."""
    eval_problems: list[Problem] = field(default_factory=list)
    """train.objective=grpo: the held-out problems scored with greedy answers."""

    @property
    def train_rows(self) -> int:
        """Rows one epoch goes through: examples (SFT) or problems (GRPO)."""
        return len(self.train_problems) if self.cfg.train.objective == "grpo" else len(self.train_examples)


def prepare(cfg: RunConfig, log: Callable[[str], None] = print) -> Run:
    """Load tokenizer, data and model; attach adapters. Data errors surface before the model loads."""
    source = resolve_source(cfg.model)
    tokenizer = load_tokenizer(source, cfg.model.trust_remote_code)
    fmt = PromptFormat.from_config(cfg.data, tokenizer)
    train_examples: list[Example] = []
    eval_examples: list[Example] = []
    train_problems: list[Problem] = []
    eval_problems: list[Problem] = []
    if cfg.train.objective == "grpo":  # questions with reference answers, sampled on by the GRPO batch source
        train_problems, eval_problems, reports = load_problem_splits(cfg.data, cfg.rl, cfg.train.seed)
    else:
        splits = load_splits(cfg.data, cfg.train.seed)
        assert splits.train_report is not None
        reports = [splits.train_report] + ([splits.eval_report] if splits.eval_kind == "file" else [])
        train_examples = build_examples(splits.train, fmt, tokenizer, cfg.data, splits.train_report)
        eval_examples = build_examples(splits.eval, fmt, tokenizer, cfg.data, splits.eval_report) if splits.eval else []
    for r in reports:
        log(r.summary())
    model = load_base_model(cfg.model, source)
    device = pick_device(cfg.model)
    # every step has the same shapes (RL completions vary in length)
    fixed = cfg.train.objective != "grpo" and len({len(ex.input_ids) for ex in train_examples}) <= 1
    model, fast = prepare_model(cfg, model, device, log, fixed_shapes=fixed)
    log(model_summary(model))
    return Run(cfg, source, tokenizer, fmt, train_examples, eval_examples, reports, model, device, fast,
               train_problems, eval_problems)


def prepare_model(cfg: RunConfig, model: Any, device: torch.device, log: Callable[[str], None] = print,
                  memory_budget_bytes: int | None = None, fixed_shapes: bool = False) -> tuple[Any, FastPath | None]:
    """Attach the adapters; on the fast path also swap in its modules, plan memory and compile.

    The fast path runs when train.fast_path is "on", or "auto" and `fast_path_supported` says its
    modules are exact for this architecture and `LoraConfig.fast_path_obstacle` finds nothing in
    the adapters' settings (decided here once: the report and the memory plan follow it).
    `memory_budget_bytes` (default: train.memory_budget, else the GPU's free memory) is what
    train.gradient_checkpointing=auto plans for; the plan counts what compiling adds.
    `fixed_shapes`: every micro-batch has the same shape (all examples one length), where
    train.compile=auto compiles.
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
    if memory_budget_bytes is None and cfg.train.memory_budget is not None:
        memory_budget_bytes = int(cfg.train.memory_budget * 2**30)
    compiled = compile_wanted(cfg.train.compile, device, fixed_shapes)
    plan = memory_plan(cfg, model, device, memory_budget_bytes, compiled)
    fast = apply_fast_path(model, plan, device, fused_mlp=cfg.lora.dropout == 0)
    if compiled:
        fast.compiled_layers = compile_layers(model)
    fast.loss_kernel = pick_loss_kernel(cfg.train.loss_kernel, device)
    return model, fast


def compile_wanted(choice: bool | str, device: torch.device, fixed_shapes: bool) -> bool:
    """train.compile: true, false, or auto -- where it was measured faster on the 7B (H200, 2026-12-01):
    one CUDA process and micro-batches of one fixed shape, whether layers are kept or recomputed
    (2x2048: 1.16x with 13 of 28 layers recomputed). Rows of changing length (packed CoT data) ran
    slower compiled (8,104 vs 9,262 tokens/s), so auto leaves them eager."""
    if choice != "auto":
        return bool(choice)
    return device.type == "cuda" and fixed_shapes and os.environ.get("WORLD_SIZE", "1") == "1"


def pick_loss_kernel(choice: str, device: torch.device) -> str:
    """The fused linear cross-entropy implementation for train.loss_kernel on `device`."""
    if choice == "liger" and not liger_available(device):
        raise UserError("train.loss_kernel=liger needs CUDA and liger-kernel installed "
                        "(pip install liger-kernel); use auto or chunked")
    return "chunked" if choice == "auto" else choice


def memory_plan(cfg: RunConfig, model: Any, device: torch.device, budget_bytes: int | None = None,
                compiled: bool = False) -> MemoryPlan:
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
    return plan_memory(shape, tokens, static, budget_bytes, gc, quantized, embedding_bytes, cfg.lora, compiled)


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
    fmt = PromptFormat.from_config(cfg.data, tokenizer)
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
