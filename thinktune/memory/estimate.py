"""Estimate: how much GPU memory a run needs, from the model's config and thinktune's own training path.

`estimate_peak(config, mode, batch, seq, lora, ...)` returns a `Breakdown` of the peak that
`torch.cuda.max_memory_allocated` reports (weights, adapters, gradients, optimizer state,
activations, logits/loss, workspace), plus what the card needs beyond it (CUDA context,
allocator slack), and the smallest common card that holds it. Every term is a formula of the
config's widths; the activation terms follow what `step.TrainStep` really keeps on either
path: the fast path (thinktune.fastpath: one-node LoRA projections, memory-saving SwiGLU and RMSNorm, packed
per-document attention, memory.planner's choice of recomputed layers, lean host offload) or the
PEFT path (PEFT LoRA layers under bf16 autocast, transformers modules); SDPA attention;
non-reentrant checkpointing of whole decoder layers; the chunked fused linear cross-entropy
(kernels/) or the plain fp32 loss. Per-layer numbers live in `layer_saved_per_token` /
`layer_transient_per_token`; when a path changes, recalibrate those two (the tests count what
autograd saves; bench/estimate_check.py --dry-run-cpu tracks every live tensor of a real step).

This module is arithmetic on config dicts: it reads no file, never imports torch, never loads
weights and never trains. memory/advice.py finds configs and turns estimates into answers
(`thinktune estimate`, the pre-flight and out-of-memory lines of `thinktune train`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from thinktune.config import LoraConfig
from thinktune.errors import UserError
from thinktune.memory.activations import (compiled_layer_bytes, layer_saved_per_token, layer_transient_per_token,
                                          loss_bytes)
from thinktune.memory.planner import plan_memory
from thinktune.memory.shapes import ALLOCATOR_SLACK, CARDS, CUDA_CONTEXT_BYTES, GIB, WORKSPACE_BYTES, ModelShape

MODES = ("infer-fp16", "infer-int8", "infer-int4", "lora", "qlora", "lora-int8")
CHECKPOINTING = ("on", "off", "auto")


# ----------------------------------------------------------------------------- static terms

def nf4_bytes(n: int) -> float:
    """Bytes of one bitsandbytes NF4 tensor of n elements (blocksize 64, double quantisation).

    n/2 (packed 4-bit) + n/64 (uint8 absmax per block) + 4 n/(64*256) (float32 absmax of those,
    per 256 blocks) + 16 + 256 float32 code entries + a float32 offset.
    """
    return n / 2 + n / 64 + 4 * n / (64 * 256) + (16 + 256 + 1) * 4


def weight_bytes(shape: ModelShape, mode: str, dtype_bytes: int = 2) -> float:
    """Bytes of the frozen base.

    16-bit: dtype_bytes * params. Quantised modes (bitsandbytes) quantise only the decoder's
    linear weights (n = linear_params, 7 tensors per layer); embeddings, LM head, norms and
    biases stay 16-bit. int8 (LLM.int8): n bytes + one float32 scale per output row.
    int4: `nf4_bytes` per tensor.
    """
    n = shape.linear_params()
    rest = (shape.params() - n) * dtype_bytes
    if mode in ("infer-int8", "lora-int8"):
        rows = shape.layers * sum(o for _, o, _ in shape.projections().values())
        return rest + n + 4 * rows
    if mode in ("infer-int4", "qlora"):
        return rest + sum(nf4_bytes(i * o) for i, o, _ in shape.projections().values()) * shape.layers
    return float(shape.params() * dtype_bytes)


def adapter_tensors(shape: ModelShape, lora: LoraConfig) -> list[int]:
    """Element counts of every trainable tensor PEFT creates (the optimiser's parameter list).

    Per layer and target of width (in, out): A is [r, in] and B is [out, r]; DoRA adds a
    magnitude vector [out]. A `lm_head` target adds one (A, B) pair of (H, V). Trainable biases
    (bias='all' / 'lora_only') join in float32 as well.
    """
    known = {**shape.projections(), "lm_head": (shape.hidden, shape.vocab, False)}
    unknown = [t for t in lora.target_modules if t not in known]
    if unknown:
        raise UserError(f"lora.target_modules {', '.join(unknown)}: the estimator knows {', '.join(known)}")
    sizes: list[int] = []
    for target in lora.target_modules:
        fan_in, fan_out, has_bias = known[target]
        copies = 1 if target == "lm_head" else shape.layers
        one = [lora.r * fan_in, fan_out * lora.r] + ([fan_out] if lora.use_dora else [])
        if has_bias and lora.bias != "none":
            one.append(fan_out)
        sizes += one * copies
    if lora.bias == "all":
        sizes += [o for t, (_, o, b) in shape.projections().items() if b and t not in lora.target_modules] * shape.layers
    return sizes


def optimizer_bytes(tensor_sizes: list[int], optimizer: str) -> float:
    """Optimizer state.

    adamw (torch): exp_avg + exp_avg_sq in float32 = 8 bytes/param, plus a float32 `step` per tensor.
    adamw_8bit (bitsandbytes): tensors of >= 4096 elements keep two uint8 states (2 bytes/param)
    + a float32 absmax per 256-block per state + two 256-entry float32 quantisation maps;
    smaller tensors keep float32 states (8 bytes/param).
    """
    if optimizer == "adamw":
        return float(sum(8 * n + 4 for n in tensor_sizes))
    if optimizer != "adamw_8bit":
        raise UserError(f"optimizer must be adamw or adamw_8bit, got {optimizer!r}")
    return float(sum(2 * n + 8 * math.ceil(n / 256) + 2048 if n >= 4096 else 8 * n for n in tensor_sizes))




# ----------------------------------------------------------------------------- the breakdown

@dataclass
class Breakdown:
    """The estimated peak, by term (bytes). `peak` is what torch.cuda.max_memory_allocated reports."""

    model: str
    mode: str
    batch: int
    seq: int
    weights: float
    adapters: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    loss: float = 0.0
    kv_cache: float = 0.0
    workspace: float = WORKSPACE_BYTES
    context: float = CUDA_CONTEXT_BYTES
    phase: str = ""
    trainable_params: int = 0
    recomputed_layers: int | None = None
    layers: int = 0
    path: str = ""
    packed: bool = False
    details: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return (self.weights + self.adapters + self.grads + self.optimizer + self.activations + self.loss
                + self.kv_cache + self.workspace)

    @property
    def slack(self) -> float:
        return ALLOCATOR_SLACK * self.peak

    @property
    def needed(self) -> float:
        """What the card must hold: the peak, the allocator's slack and the CUDA context."""
        return self.peak + self.slack + self.context

    def card(self) -> str | None:
        """The smallest common card the run fits on, or None when even the largest is too small."""
        return next((name for gib, name in CARDS if self.needed <= gib * GIB), None)

    def to_dict(self) -> dict[str, Any]:
        keys = ("model", "mode", "batch", "seq", "path", "packed", "weights", "adapters", "grads", "optimizer", "activations",
                "loss", "kv_cache", "workspace", "context", "phase", "trainable_params", "recomputed_layers")
        out: dict[str, Any] = {k: getattr(self, k) for k in keys}
        out.update(peak=self.peak, slack=self.slack, needed=self.needed, card=self.card(), details=self.details)
        return out

    def table(self) -> str:
        gib = lambda x: f"{x / GIB:8.2f} GiB"  # noqa: E731
        rows = [("weights", self.weights)]
        if self.trainable_params:
            trained = (f"fp32 master ({self.trainable_params / 1e9:.2f}B) + grads + optimizer" if self.mode == "full"
                       else f"adapters ({self.trainable_params / 1e6:.1f}M fp32) + grads + optimizer")
            rows.append((trained, self.adapters + self.grads + self.optimizer))
        if self.kv_cache:
            rows.append(("KV cache", self.kv_cache))
        rows += [("activations", self.activations), ("logits / loss", self.loss), ("workspace (cuBLAS)", self.workspace)]
        width = 46
        lines = [f"  {label:<{width}}{gib(value)}" for label, value in rows]
        if self.trainable_params:
            lines[1] += (f"   ({self.adapters / GIB:.2f} + {self.grads / GIB:.2f} + {self.optimizer / GIB:.2f})")
        detail = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.details.items() if v)
        if detail:
            lines[len(rows) - 3] += f"   ({detail})"
        lines.append(f"  {'= peak allocated (max_memory_allocated)':<{width}}{gib(self.peak)}   at: {self.phase}")
        lines.append(f"  {'+ CUDA context (not in max_memory_allocated)':<{width}}{gib(self.context)}")
        lines.append(f"  {'+ allocator slack (reserved - allocated)':<{width}}{gib(self.slack)}")
        card = self.card()
        fits = f"fits {card}" if card else f"fits no single card up to {CARDS[-1][1]}"
        lines.append(f"  {'= needed on the card':<{width}}{gib(self.needed)}   -> {fits}")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


# ----------------------------------------------------------------------------- the estimate

def estimate_peak(model_config: dict[str, Any] | ModelShape, mode: str = "lora", batch: int = 2, seq: int = 2048,
                  lora: LoraConfig | None = None, optimizer: str = "adamw", checkpointing: str = "on",
                  packing: bool | str = False, fused_loss: bool | None = None, precision: str = "bf16",
                  padded: bool | None = None, grad_accum: int = 1, budget_bytes: float | None = None,
                  fused_optimizer: bool = True, fast_path: str = "auto", name: str = "model",
                  compiled: bool = False) -> Breakdown:
    """Estimate the peak GPU memory of one training step (or of inference) as thinktune runs it.

    Args:
        model_config: a config.json dict or a ModelShape.
        mode: infer-fp16 | infer-int8 | infer-int4 | lora (bf16 base) | qlora (NF4 base) | lora-int8.
        batch, seq: micro-batch rows and their (padded) length; for inference, the context length.
        lora: rank and targets (default: thinktune's LoraConfig, r=16 on the seven projections).
        optimizer: adamw | adamw_8bit.
        checkpointing: on (every layer recomputed) | off | auto: as setup.prepare_model does it --
            the PEFT path recomputes every layer; the fast path asks memory.planner.plan_memory for the
            fewest recomputed layers that fit `budget_bytes` (default: the smallest card on which
            "on" fits, less the CUDA context).
        packing: batch*seq tokens in one padding-free row of several documents; "auto" (train.packing's
            default): packed on the fast path, as loop.Trainer does.
        fused_loss: chunked fused cross-entropy; None = when TrainStep uses it (plain head, no softcap).
        precision: bf16 | fp16 | fp32 (fp32 also means fp32 weights and activations).
        padded: rows carry padding (attention mask path); None = not packing.
        grad_accum: > 1 keeps the adapter gradients alive through later micro-batches' forward.
        fused_optimizer: torch's fused AdamW (CUDA); the foreach version (CPU) needs 4 bytes/param more.
        fast_path: auto | on | off, as train.fast_path in the config (auto: on where fastpath has exact twins).
        compiled: the fast path's decoder layers are compiled (train.compile): each kept layer holds
            `memory.activations.compiled_layer_bytes` more, and the planner counts it too.
    Returns a Breakdown. Raises UserError on an unknown mode, optimizer or target.
    """
    shape = model_config if isinstance(model_config, ModelShape) else ModelShape.from_config(model_config)
    if mode not in MODES:
        raise UserError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if checkpointing not in CHECKPOINTING:
        raise UserError(f"checkpointing must be on, off or auto, got {checkpointing!r}")
    if batch < 1 or seq < 2:
        raise UserError(f"batch must be >= 1 and seq >= 2, got {batch} x {seq}")
    a = 4 if precision == "fp32" else 2
    lora = lora or LoraConfig()
    if mode.startswith("infer"):
        return _inference(shape, mode, batch, seq, a, name)
    if fused_loss is None:
        fused_loss = not shape.logit_softcap and "lm_head" not in lora.target_modules
    # setup.prepare_model takes the fast path only where it fits the model and the adapters
    path = "fast" if fast_path != "off" and shape.fast_ok and lora.fast_path_obstacle() is None else "peft"
    packed = packing is True or (packing == "auto" and path == "fast")
    sizes = adapter_tensors(shape, lora)
    base = Breakdown(model=name, mode=mode, batch=batch, seq=seq, weights=weight_bytes(shape, mode, a),
                     adapters=4.0 * sum(sizes), optimizer=optimizer_bytes(sizes, optimizer),
                     trainable_params=sum(sizes), layers=shape.layers, path=path, packed=packed)
    step = _Step(shape, lora, batch, seq, a, fused_loss, not packed if padded is None else padded, packed,
                 grad_accum, fused_optimizer, path, compiled and path == "fast")
    if checkpointing != "auto" or path == "peft":
        return step.peak(base, shape.layers if checkpointing != "off" else 0)
    if budget_bytes is None:
        on = step.peak(base, shape.layers)
        card = next((gib for gib, _ in CARDS if on.needed <= gib * GIB), None)
        if card is None:
            return on
        budget_bytes = card * GIB - CUDA_CONTEXT_BYTES
    return step.planned(base, budget_bytes)


@dataclass
class _Step:
    """One training step's activation terms for a shape and its inputs (see `estimate_peak`)."""

    shape: ModelShape
    lora: LoraConfig
    batch: int
    seq: int
    a: int
    fused: bool
    padded: bool
    packed: bool
    grad_accum: int
    fused_optimizer: bool
    path: str
    compiled: bool = False

    def planned(self, base: Breakdown, budget_bytes: float) -> Breakdown:
        """checkpointing=auto on the fast path: the plan memory.planner makes, estimated here."""
        shape, tokens = self.shape, self.batch * self.seq
        embedding = 0 if shape.tie else shape.vocab * shape.hidden * self.a
        static = int(base.weights + base.adapters + 3 * base.trainable_params * 4)  # as setup.memory_plan counts it
        plan = plan_memory(shape, tokens, static, int(budget_bytes), "auto", quantized=base.mode == "qlora",
                           embedding_bytes=embedding, lora=self.lora, compiled=self.compiled)
        out = self.peak(base, plan.checkpointed_layers, embedding if plan.cpu_embedding else 0, plan.offload_checkpoints)
        out.notes.append(f"checkpointing auto for {budget_bytes / GIB:.1f} GiB: {plan.describe().split(' (')[0]}")
        return out

    def peak(self, base: Breakdown, recomputed: int, host_embedding: float = 0.0, offload: bool = False) -> Breakdown:
        """The peak over the step's phases, with the first `recomputed` layers checkpointed.

        T = batch * seq tokens, rows = batch * (seq - 1) loss rows. A checkpointed layer keeps its
        input (a*H*T; nothing with `offload`, which parks it in host memory); any other layer keeps
        its saved set (layer_saved_per_token * T) and its 16-bit copies of the adapters (a * params / L).
          loss phase:     stored layers + final norm + mask + loss_bytes (+ grads if grad_accum > 1).
                          fused: the final norm's output stays (peft: float32 input 4H + 4 and aH;
                          fast: its input aH + 4 and aH); on the PEFT path the peak is inside autocast,
                          whose cache still holds the recomputed layers' adapter copies.
                          plain: the peak is in backward, the norm's output is gone.
          backward at l:  stored layers 0..l + (saved + copies if l was checkpointed, recomputed now)
                          + transient + mask + gradients of the layers above l (all if grad_accum > 1)
          optimizer step: every gradient (+ sqrt(exp_avg_sq), 4 bytes/param, in torch's foreach AdamW;
                          fused AdamW and bitsandbytes need no temporaries)
        A 4-/8-bit base adds one dequantised projection weight (the largest, I * H * a) to the transient;
        mask = the padding mask [B, S, S] (bool), shared by all layers.
        """
        shape, a, tokens, rows = self.shape, self.a, self.batch * self.seq, self.batch * (self.seq - 1)
        casts = a < 4 and base.mode == "lora"  # PEFT's plain Linear casts; its bitsandbytes layers don't under autocast
        per_token = layer_saved_per_token(shape, self.lora, a, self.seq, self.padded, self.path, casts, self.packed)
        copies = (a * base.trainable_params if a < 4 else 0) / shape.layers
        saved = sum(per_token.values()) * tokens + copies
        transient = layer_transient_per_token(shape, self.lora, a, self.path, casts) * tokens
        if base.mode in ("qlora", "lora-int8"):  # bitsandbytes dequantises one projection's weight per matmul
            transient += max(i * o for i, o, _ in shape.projections().values()) * a
        checkpoint = 0.0 if offload else a * shape.hidden * tokens
        kept_layer = saved + (compiled_layer_bytes(shape, tokens, a) if self.compiled else 0)
        stored = [checkpoint if layer < recomputed else kept_layer for layer in range(shape.layers)]
        grads, mask = base.adapters, (self.batch * self.seq * self.seq if self.padded else 0)
        norm_input = (4 if self.path == "peft" else a) * shape.hidden + 4
        final_norm = (norm_input + (a * shape.hidden if self.fused else 0)) * tokens
        cached = copies * recomputed if self.fused and self.path == "peft" else 0.0
        kept = "checkpoints" if recomputed == shape.layers else "saved layers" if recomputed == 0 else "stored layers"
        loss_name = f"loss ({'fused chunked' if self.fused else 'plain fp32'})"
        phases = [(sum(stored) + final_norm + mask + cached, loss_name, loss_bytes(shape, rows, self.fused, a, a),
                   {kept: sum(stored), "final norm": final_norm}, grads if self.grad_accum > 1 else 0.0)]
        for layer in reversed(range(shape.layers)):
            live = sum(stored[: layer + 1]) + transient + (saved if layer < recomputed else 0) + mask
            done = grads if self.grad_accum > 1 else grads / shape.layers * (shape.layers - layer - 1)
            what = "recompute + backward" if layer < recomputed else "backward"
            phases.append((live, f"{what} of layer {layer + 1}/{shape.layers}", 0.0,
                           {kept: sum(stored[: layer + 1]), "working layer": live - sum(stored[: layer + 1])}, done))
        temporaries = 0.0 if self.fused_optimizer else grads
        phases.append((temporaries, "optimizer step", 0.0, {"optimizer temporaries": temporaries}, grads))
        acts, phase, loss, details, grad_part = max(phases, key=lambda p: p[0] + p[2] + p[4])
        out = replace(base, weights=base.weights - host_embedding, activations=acts, loss=loss, grads=grad_part,
                      phase=phase, details=details, recomputed_layers=recomputed, notes=list(base.notes))
        if host_embedding:
            out.notes.append(f"the input embedding ({host_embedding / GIB:.2f} GiB) waits in host memory (lean mode)")
        if self.lora.use_dora:
            out.notes.append("DoRA's weight-norm buffers are not modelled: expect more")
        if self.padded:
            out.notes.append("assumes padded rows (repeated k/v, float mask); packed or unpadded rows need less")
        return out


def _inference(shape: ModelShape, mode: str, batch: int, seq: int, a: int, name: str) -> Breakdown:
    """Generation with `seq` tokens of context: weights + KV cache + the prefill's working set.

    KV cache: 2 (k, v) * layers * KV * T * a.  Prefill, the MLP moment of one layer:
    residual in and out (2aH) + a float32 norm (4H) + gate, SiLU and up outputs (3aI), per token;
    a 4-/8-bit base dequantises one projection at a time (largest: I * H * a).
    Logits: only the last position, in float32 for sampling: batch * V * (a + 4).
    """
    tokens = batch * seq
    prefill = tokens * (2 * a * shape.hidden + 4 * shape.hidden + 3 * a * shape.intermediate)
    if mode != "infer-fp16":
        prefill += shape.intermediate * shape.hidden * a
    return Breakdown(model=name, mode=mode, batch=batch, seq=seq, weights=weight_bytes(shape, mode, a),
                     kv_cache=2.0 * shape.layers * shape.kv_dim * tokens * a, activations=prefill,
                     loss=batch * shape.vocab * (a + 4.0), phase="prefill", layers=shape.layers)

