"""Train: our plain-PyTorch loop around one replaceable `TrainStep`.

`prepare(cfg)` turns a RunConfig into a `Run` (tokenizer, examples, model with
adapters); `train(cfg, resume)` runs the loop: micro-batches in a (seed, epoch)-fixed
order, gradient accumulation with the loss normalised by the step's target tokens,
warm-up + linear/cosine schedule, pre-clip grad norm, NaN/Inf steps skipped, spikes
flagged, metrics to metrics.jsonl/TensorBoard, atomic checkpoints and exact resume,
graceful stop on Ctrl-C/SIGTERM. The step itself (`TrainStep`) is what the GPU
benchmark times, so a faster step replaces it without touching the loop.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from thinktune.config import RunConfig
from thinktune.data import (IGNORE_INDEX, DataReport, Example, PromptFormat, build_examples, carve_eval, collate,
                            load_samples)
from thinktune.errors import UserError
from thinktune.fastpath import FastPath, apply_fast_path, compile_layers, fast_path_supported, lora_layer_mapping
from thinktune.kernels import fused_linear_cross_entropy
from thinktune.lora import attach_lora
from thinktune.memory_plan import MemoryPlan, ModelShape, plan_memory
from thinktune.offload import PinnedOffload
from thinktune.model import ModelSource, load_base_model, load_tokenizer, model_summary, pick_device, resolve_source

SPIKE_WINDOW = 50


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


@dataclass
class LoopState:
    """What a checkpoint restores besides weights and optimizer: position and bookkeeping."""

    step: int = 0
    micro_batch: int = 0  # micro-batches of the run consumed so far, over all ranks (a world-size-free position)
    consecutive_bad: int = 0
    bad_steps: list[int] = field(default_factory=list)
    spikes: list[int] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    window_loss: float = 0.0
    window_steps: int = 0
    best_eval_loss: float | None = None
    best_eval_step: int | None = None
    best_checkpoint: str | None = None


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    target_tokens: int
    real_tokens: int
    skipped: bool


# ----------------------------------------------------------------------------- setup

def precision_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for plain fp32."""
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and precision == "fp16":
        raise UserError("train.precision=fp16 needs a GPU; use fp32 (or bf16) on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def prepare(cfg: RunConfig, log: Callable[[str], None] = print) -> Run:
    """Load tokenizer, data and model; attach adapters. Data errors surface before the model loads."""
    source = resolve_source(cfg.model)
    tokenizer = load_tokenizer(source, cfg.model.trust_remote_code)
    fmt = PromptFormat(cfg.data.template, tokenizer)
    samples, report = load_samples(cfg.data.path, cfg.data)
    reports = [report]
    if cfg.data.eval_path or cfg.data.eval_split:
        eval_samples, eval_report = load_samples(cfg.data.eval_path or cfg.data.path, cfg.data, cfg.data.eval_split)
        eval_report.source = f"eval {eval_report.source}"
        reports.append(eval_report)
    else:
        samples, eval_samples = carve_eval(samples, cfg.data.eval_size, cfg.train.seed)
        eval_report = DataReport(source="eval (carved from train)", rows_read=len(eval_samples))
    train_examples = build_examples(samples, fmt, tokenizer, cfg.data, report)
    eval_examples = build_examples(eval_samples, fmt, tokenizer, cfg.data, eval_report) if eval_samples else []
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
    modules are exact for this architecture. `memory_budget_bytes` (default: the GPU's memory)
    is what train.gradient_checkpointing=auto plans for.
    """
    supported, why = fast_path_supported(model)
    if cfg.train.fast_path == "on" and not supported:
        raise UserError(f"train.fast_path=on, but the fast path does not fit this model: {why}; use auto or off")
    gc = cfg.train.gradient_checkpointing
    if cfg.train.fast_path == "off" or not supported:
        checkpointing = gc is True or (gc == "auto" and device.type == "cuda")
        return attach_lora(model, cfg.lora, cfg.train.seed, checkpointing), None
    model = attach_lora(model, cfg.lora, cfg.train.seed, False, custom_modules=lora_layer_mapping())
    plan = memory_plan(cfg, model, device, memory_budget_bytes)
    fast = apply_fast_path(model, plan, device)
    # auto: where it was measured faster (issue 4): one CUDA process, no layer recomputed
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
    shape = ModelShape.from_config(config, quantized, embedding_bytes)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    static = torch.cuda.memory_allocated(device) + trainable * (4 + 8)  # + gradients and two AdamW moments
    if budget_bytes is None:
        free, _total = torch.cuda.mem_get_info(device)
        budget_bytes = free + torch.cuda.memory_reserved(device)
    tokens = cfg.train.batch_size * cfg.data.max_seq_length
    return plan_memory(shape, tokens, static, budget_bytes, gc)


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


def lr_at(step: int, total: int, cfg: RunConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then the schedule."""
    peak, warm = cfg.train.lr, cfg.train.warmup_steps
    if step < warm:
        return peak * (step + 1) / (warm + 1)
    if cfg.train.schedule == "constant":
        return peak
    progress = (step - warm) / max(1, total - warm)
    if cfg.train.schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return peak * max(0.0, 1.0 - progress)


def total_steps(cfg: RunConfig, num_examples: int, world_size: int = 1) -> int:
    per_epoch = math.ceil(num_examples / cfg.train.batch_size)
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * per_epoch / (cfg.train.grad_accum * world_size)))


# ----------------------------------------------------------------------------- the step

def causal_lm_parts(model: Any) -> tuple[Any, Any]:
    """(decoder that returns hidden states, lm_head) of a PEFT-wrapped causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def fused_loss_applies(model: Any, fast: FastPath | None = None) -> tuple[bool, str]:
    """Whether the fused linear cross-entropy computes the same loss as the model's own head, and why.

    With `fast` (what `prepare` did), the reason also lists the fused modules and the memory plan.
    """
    fused, why = _fused_loss_reason(model)
    if fast is not None:
        return fused, f"{why}; {fast.describe()}" if fused else f"{why}; still {fast.describe()}"
    return fused, why


def _fused_loss_reason(model: Any) -> tuple[bool, str]:
    try:
        decoder, head = causal_lm_parts(model)
    except (AttributeError, NotImplementedError):
        return False, "the model exposes no decoder/lm_head"
    if decoder is None or not isinstance(head, torch.nn.Linear) or type(head) is not torch.nn.Linear:
        return False, "the LM head is adapted or not a plain Linear"
    if head.bias is not None:
        return False, "the LM head has a bias"
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False, "the model scales or soft-caps its logits"
    return True, f"fused linear cross-entropy: the {head.out_features:,}-vocab logits are never materialised"


class CausalLMLoss(torch.nn.Module):
    """forward(batch) -> sum of next-token losses over the batch's target tokens.

    A module (not a function) so that data-parallel wrappers (DDP, FSDP) can wrap the
    whole forward + loss. With `fused=True` the LM head and cross-entropy run chunked
    (kernels.fused_linear_cross_entropy) and the full logits never exist.
    """

    def __init__(self, model: Any, fused: bool, offload: bool = False):
        super().__init__()
        self.model = model
        self.fused = fused
        self.offload = PinnedOffload() if offload else None

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, seq_lens: torch.Tensor | None = None,
                **_: Any) -> torch.Tensor:
        """A packed row (data.collate_packed) carries `seq_lens`: they reach the attention as
        `document_lengths` (the fast path's per-document attention); transformers' own attention
        finds the documents from the restarting `position_ids` instead."""
        targets = labels[:, 1:].reshape(-1)
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                  "position_ids": position_ids, "use_cache": False}
        if seq_lens is not None:
            inputs["document_lengths"] = tuple(int(n) for n in seq_lens.tolist())
        with self.offload() if self.offload is not None else contextlib.nullcontext():
            if self.fused:
                decoder, head = causal_lm_parts(self.model)
                hidden = decoder(**inputs).last_hidden_state[:, :-1]
                return fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, targets,
                                                  ignore_index=IGNORE_INDEX, reduction="sum")
            logits = self.model(**inputs).logits[:, :-1]
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets,
                                   ignore_index=IGNORE_INDEX, reduction="sum")


class TrainStep:
    """One optimizer step over a list of micro-batches: forward, backward, clip, update.

    The loss is the sum of token losses over the step divided by the step's target
    tokens (so accumulation equals one big batch). A step whose loss or grad norm is
    not finite updates nothing. `grad_norm` is the norm before clipping.
    Seams for data parallelism: `loss_module` may be a DDP-wrapped `CausalLMLoss`,
    `no_sync(is_last)` returns the context for each micro-batch's backward, and
    `count_tokens` may all-reduce the step's target-token count across processes
    (`loss_multiplier` then undoes the wrapper's gradient averaging).
    """

    def __init__(self, model: Any, optimizer: torch.optim.Optimizer, device: torch.device,
                 amp_dtype: torch.dtype | None, max_grad_norm: float, fused_loss: bool,
                 loss_module: torch.nn.Module | None = None, fast: FastPath | None = None):
        self.model = model
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.device = device
        self.amp_dtype = amp_dtype
        self.max_grad_norm = max_grad_norm
        offload = fast is not None and fast.offload_checkpoints
        self.loss_module = loss_module if loss_module is not None else CausalLMLoss(model, fused_loss, offload)
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        self.loss_multiplier = 1.0
        self.no_sync: Callable[[bool], Any] = lambda is_last: contextlib.nullcontext()
        self.count_tokens: Callable[[int], int] = lambda local: local

    def __call__(self, micro_batches: list[dict[str, torch.Tensor]], lr: float) -> StepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
        target_tokens = self.count_tokens(local_tokens)
        denom = max(1, target_tokens)
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        real_tokens = 0
        for i, batch in enumerate(micro_batches):
            # counted on the host copy: reading a device tensor here would sync the GPU every micro-batch
            real_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self.no_sync(i == len(micro_batches) - 1):
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss = self.loss_module(**batch) / denom
                total += loss.detach()
                scaled = loss * self.loss_multiplier
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        loss_value = float(total)
        skipped = not (math.isfinite(loss_value) and math.isfinite(grad_norm))
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips by itself on inf; we still count it below
            self.scaler.update()
        elif not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_value, grad_norm, target_tokens, real_tokens, skipped)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_loss(model: Any, examples: list[Example], batch_size: int, pad_id: int, device: torch.device,
                  amp_dtype: torch.dtype | None = None) -> tuple[float, int]:
    """Mean next-token loss over the examples' target tokens, and the token count."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i: i + batch_size], pad_id).items()}
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        labels = batch["labels"][:, 1:]
        total += float(F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction="sum"))
        tokens += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(1, tokens), tokens
