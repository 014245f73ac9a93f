"""Estimate: how much GPU memory a run needs, from the model's config and thinktune's own training path.

`estimate_peak(config, mode, batch, seq, lora, ...)` returns a `Breakdown` of the peak that
`torch.cuda.max_memory_allocated` reports (weights, adapters, gradients, optimizer state,
activations, logits/loss, workspace), plus what the card needs beyond it (CUDA context,
allocator slack), and the smallest common card that holds it. Every term is a formula of the
config's widths; the activation terms follow what `training.TrainStep` really keeps on either
path: the fast path (thinktune.fastpath: fused LoRA projections, SwiGLU and RMSNorm, packed
per-document attention, memory_plan's choice of recomputed layers, lean host offload) or the
PEFT path (PEFT LoRA layers under bf16 autocast, transformers modules); SDPA attention;
non-reentrant checkpointing of whole decoder layers; the chunked fused linear cross-entropy
(kernels/) or the plain fp32 loss. Per-layer numbers live in `layer_saved_per_token` /
`layer_transient_per_token`; when a path changes, recalibrate those two (the tests count what
autograd saves; bench/estimate_check.py --dry-run-cpu tracks every live tensor of a real step).

This module is arithmetic on config dicts: it reads no file, never imports torch, never loads
weights and never trains. thinktune/preflight.py finds configs and turns estimates into answers
(`thinktune estimate`, the pre-flight and out-of-memory lines of `thinktune train`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from thinktune.config import LoraConfig
from thinktune.errors import UserError

GIB = 2**30
MODES = ("infer-fp16", "infer-int8", "infer-int4", "lora", "qlora", "lora-int8")
CHECKPOINTING = ("on", "off", "auto")

CUDA_CONTEXT_BYTES = 0.5 * GIB
"""CUDA context + loaded kernels (lazy loading): on the card but not in max_memory_allocated."""
ALLOCATOR_SLACK = 0.03
"""Fraction of the peak the caching allocator holds beyond it (fragmentation: reserved - allocated);
memory_plan keeps a similar margin (2% + 128 MiB). bench/estimate_check.py measures it."""
WORKSPACE_BYTES = 64 * 2**20
"""cuBLAS/cuBLASLt workspaces: allocated through PyTorch's allocator, so inside max_memory_allocated."""
FUSED_CE_CHUNK_BUDGET = 256 * 2**20
"""Mirror of kernels.fused_ce.DEFAULT_CHUNK_BYTES (checked equal by the tests; not imported: no torch here)."""

FAST_MODEL_TYPES = frozenset({"qwen2", "llama", "mistral", "qwen3"})
"""Model types whose norms fastpath.RMSNORM_CLASSES fuses (with a SiLU gate/up/down MLP)."""

CARDS: list[tuple[float, str]] = [
    (7.9, "8 GB (RTX 4060, RTX 3070)"),
    (11.9, "12 GB (RTX 3060, RTX 4070)"),
    (15.9, "16 GB (RTX 4080, RTX 4060 Ti 16GB)"),
    (23.9, "24 GB (RTX 3090, RTX 4090)"),
    (39.5, "40 GB (A100 40GB)"),
    (44.9, "48 GB (L40S, RTX A6000)"),
    (79.2, "80 GB (A100 80GB, H100 80GB)"),
    (139.8, "141 GB (H200)"),
]
"""(GiB that torch reports as the card's total memory, name), smallest first."""

_QWEN2 = {"model_type": "qwen2", "num_hidden_layers": 28, "tie_word_embeddings": False}
_LLAMA = {"model_type": "llama", "attention_bias": False, "tie_word_embeddings": False}
PRESETS: dict[str, dict[str, Any]] = {
    "r1-1.5b": {**_QWEN2, "_base": "Qwen2.5-Math-1.5B", "hidden_size": 1536, "intermediate_size": 8960,
                "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936},
    "r1-7b": {**_QWEN2, "_base": "Qwen2.5-Math-7B", "hidden_size": 3584, "intermediate_size": 18944,
              "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064},
    "r1-8b": {**_LLAMA, "_base": "Llama-3.1-8B", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
    "r1-14b": {**_QWEN2, "_base": "Qwen2.5-14B", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 48,
               "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064},
    "r1-32b": {**_QWEN2, "_base": "Qwen2.5-32B", "hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64,
               "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064},
    "r1-70b": {**_LLAMA, "_base": "Llama-3.3-70B", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
               "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256},
}
"""Architectures of the DeepSeek-R1 distills (public config.json facts), by size."""
PRESET_HUB_IDS = {
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": "r1-1.5b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": "r1-7b",
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": "r1-8b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": "r1-14b",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": "r1-32b", "deepseek-ai/DeepSeek-R1-Distill-Llama-70B": "r1-70b",
}


# ----------------------------------------------------------------------------- the model's shape

@dataclass(frozen=True)
class ModelShape:
    """The widths of a dense decoder-only transformer (Llama/Qwen2/Mistral family) that memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    logit_softcap: bool = False
    fast_ok: bool = True
    """thinktune's fast path has exact fused twins for this architecture (SiLU SwiGLU, Llama/Qwen RMSNorm)."""

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def projections(self) -> dict[str, tuple[int, int, bool]]:
        """(in_features, out_features, has_bias) of each decoder layer's linear layers, by module name."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return {"q_proj": (h, q, self.qkv_bias), "k_proj": (h, kv, self.qkv_bias), "v_proj": (h, kv, self.qkv_bias),
                "o_proj": (q, h, self.o_bias), "gate_proj": (h, i, self.mlp_bias), "up_proj": (h, i, self.mlp_bias),
                "down_proj": (i, h, self.mlp_bias)}

    def linear_params(self) -> int:
        """Weights (not biases) of all decoder linear layers: what 4-/8-bit loading quantises."""
        return self.layers * sum(i * o for i, o, _ in self.projections().values())

    def params(self) -> int:
        """Exact parameter count, as `sum(p.numel() for p in model.parameters())` gives it.

        embed V*H + layers * (sum of projection weights and biases + 2 RMSNorm weights H)
        + final norm H + (untied head V*H).
        """
        biases = sum(o for _, o, has in self.projections().values() if has)
        per_layer = sum(i * o for i, o, _ in self.projections().values()) + biases + 2 * self.hidden
        head = 0 if self.tie else self.vocab * self.hidden
        return self.vocab * self.hidden + self.layers * per_layer + self.hidden + head

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelShape":
        """Read a transformers config.json dict (nested `text_config` too). Raises UserError when it is not a dense decoder."""
        cfg = config.get("text_config") if "hidden_size" not in config and isinstance(config.get("text_config"), dict) else config
        for key in ("num_experts", "num_local_experts", "n_routed_experts"):
            if cfg.get(key):
                raise UserError(f"mixture-of-experts configs ({key}={cfg[key]}) are not supported by the estimator")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
                   if not isinstance(cfg.get(k), int)]
        if missing:
            raise UserError(f"model config lacks {', '.join(missing)}: not a decoder-only transformer config.json")
        heads = cfg["num_attention_heads"]
        model_type = str(cfg.get("model_type", ""))
        attention_bias = cfg.get("attention_bias")
        return cls(
            hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"], layers=cfg["num_hidden_layers"],
            heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab=cfg["vocab_size"],
            tie=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(attention_bias) if attention_bias is not None else model_type == "qwen2",
            o_bias=bool(attention_bias), mlp_bias=bool(cfg.get("mlp_bias", False)),
            logit_softcap=bool(cfg.get("final_logit_softcapping") or cfg.get("logit_scale")),
            fast_ok=model_type in FAST_MODEL_TYPES and cfg.get("hidden_act", "silu") in ("silu", "swish"),
        )


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


# ----------------------------------------------------------------------------- activation terms

def layer_saved_per_token(shape: ModelShape, lora: LoraConfig, act_bytes: int, seq: int, padded: bool,
                          path: str = "fast", casts_input: bool = True, packed: bool = False) -> dict[str, float]:
    """Bytes per token that one decoder layer keeps for backward (no checkpointing), by what keeps them.

    a = activation bytes (2 under bf16/fp16 autocast, 4 in fp32); H, Q, KV, I = hidden, query,
    key/value and MLP widths; r = LoRA rank. Frozen base Linears save no input. Both paths:
      attention: rotated q, k and v, SDPA output, log-sum-exp   a * (2Q + 2KV) + 4 * heads;
            with a padding mask, k and v are repeated to all heads (2Q instead of 2KV) and the
            float mask [B, 1, S, S] is saved by the memory-efficient kernel (a * S per token);
            a packed row of several documents adds a contiguous copy of the output (a * Q)
      LoRA: each adapter's x A^T                          a * r  per target
    path "fast" (thinktune.fastpath: kernels.rms_norm, lora_linear, lora_mlp):
      two RMSNorms keep their input and 1/rms             2 * (aH + 4)
      q, k, v share one saved input; the MLP keeps its input   aH + aH
      the MLP keeps gate and up outputs (the product is recomputed)   2 * a * I
    path "peft" (PEFT LoRA layers, transformers modules):
      two RMSNorms keep a float32 copy of their input and 1/rms   2 * (4H + 4)
      PEFT's Linear casts each adapted input to float32 and autocast casts it back to a new
      16-bit copy that lora_A saves (casts_input)   a * in  per target (q, k, v, gate, up: H;
      o: Q; down: I); PEFT's bitsandbytes layers (under autocast) and fp32 runs save the input
      itself, once per distinct input (o_proj's is the SDPA output, saved anyway)
      MLP: gate output (SiLU input), SiLU output and up output   3 * a * I
    Checked against what autograd saves (saved-tensor hooks, tests/test_estimate.py). For the 7B
    (H 3584, Q 3584, KV 512, I 18944), r=16 on all seven: fast 121,176, peft 239,960 bytes/token.
    """
    a, h, q, kv, i = act_bytes, shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    targets = [t for t in lora.target_modules if t != "lm_head"]
    widths = {name: fan_in for name, (fan_in, _, _) in shape.projections().items()}
    terms = {
        "LoRA A outputs": a * lora.r * len(targets),
        "attention q, k, v, output, lse": 2 * a * q + 2 * a * (q if padded else kv) + 4 * shape.heads,
        "attention padding mask": a * seq if padded else 0,
        "packed-row output copy": a * q if packed else 0,
    }
    if path == "fast":
        qkv = any(t in targets for t in ("q_proj", "k_proj", "v_proj"))
        terms.update({"norms (input, 1/rms)": 2 * (a * h + 4), "attention input": a * h if qkv else 0,
                      "MLP input": a * h, "MLP gate, up": 2 * a * i})
        return terms
    if casts_input:
        copies = sum(a * widths[t] for t in targets)
    else:
        groups = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("down_proj",)]
        copies = sum(a * widths[g[0]] for g in groups if any(t in targets for t in g))
    terms.update({"norms (float32 input, 1/rms)": 2 * (4 * h + 4), "LoRA input copies": copies,
                  "MLP gate, SiLU, up": 3 * a * i})
    return terms


def layer_transient_per_token(shape: ModelShape, lora: LoraConfig, act_bytes: int, path: str = "fast",
                              casts_input: bool = True) -> float:
    """Bytes per token live on top of a layer's saved set at its worst moment (recompute or backward).

    Measured with the live-storage tracker of bench/estimate_check.py (CPU, the same autograd graph).
    fast: the MLP's backward, where silu(gate), the recomputed product, the product's gradient
      and the gradient arriving from above are alive:  3aI + aH.
    peft: down_proj's LoRA cast in the (re)computed forward: the MLP product (a*I), its float32
      cast (4I, when down_proj's input is cast) and five hidden-sized tensors (the residual, the
      MLP input, down's base output, the gradient from above and its accumulation): a*I + 4I + 5aH;
      PEFT's bitsandbytes layers cast nothing but clone the base output:  a*I + 6aH.
    """
    a, i, h = act_bytes, shape.intermediate, shape.hidden
    if path == "fast":
        return 3 * a * i + a * h
    if not casts_input:
        return a * i + 6 * a * h
    cast = 4 * i if "down_proj" in lora.target_modules else 0
    return a * i + cast + 5 * a * h


def loss_bytes(shape: ModelShape, rows: int, fused: bool, act_bytes: int, dtype_bytes: int,
               chunk_budget: int = FUSED_CE_CHUNK_BUDGET) -> float:
    """Bytes of the LM head + loss at their worst moment (beyond the final norm's tensors).

    fused (kernels.fused_linear_cross_entropy, chunked): a flattened copy of the hidden rows and
      their gradient (2 * a * H * rows) plus one chunk of C = default_chunk_size(V) rows whose
      logits exist in the head's dtype and in float32 together: C * V * (4 + head bytes) (fp32: 4).
    plain (TrainStep's fallback): float32 logits, their log-softmax (saved) and, in backward, two
      float32 gradients alive with it: 12 * V * rows.
    rows = B * (S - 1) (every position has a target: the worst case).
    """
    if not fused:
        return 12.0 * shape.vocab * rows
    chunk = _chunk_rows(shape.vocab, chunk_budget)
    per_elem = 4 + (dtype_bytes if dtype_bytes < 4 else 0)
    return 2.0 * act_bytes * shape.hidden * rows + min(chunk, rows) * (shape.vocab * per_elem + act_bytes * shape.hidden)


def _chunk_rows(vocab: int, budget: int) -> int:
    """Same rule as kernels.fused_ce.default_chunk_size (rows of float32 logits in `budget`, multiple of 8)."""
    rows = budget // (4 * vocab)
    if rows >= 8:
        rows -= rows % 8
    return max(1, int(rows))


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
            rows.append((f"adapters ({self.trainable_params / 1e6:.1f}M fp32) + grads + optimizer",
                         self.adapters + self.grads + self.optimizer))
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
                  fused_optimizer: bool = True, fast_path: str = "auto", name: str = "model") -> Breakdown:
    """Estimate the peak GPU memory of one training step (or of inference) as thinktune runs it.

    Args:
        model_config: a config.json dict or a ModelShape.
        mode: infer-fp16 | infer-int8 | infer-int4 | lora (bf16 base) | qlora (NF4 base) | lora-int8.
        batch, seq: micro-batch rows and their (padded) length; for inference, the context length.
        lora: rank and targets (default: thinktune's LoraConfig, r=16 on the seven projections).
        optimizer: adamw | adamw_8bit.
        checkpointing: on (every layer recomputed) | off | auto: as training.prepare_model does it --
            the PEFT path recomputes every layer; the fast path asks memory_plan.plan_memory for the
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
    # the fast modules fall back to PEFT's forward for DoRA and LoRA dropout: count those as PEFT
    path = "fast" if fast_path != "off" and shape.fast_ok and not lora.use_dora and lora.dropout == 0 else "peft"
    packed = packing is True or (packing == "auto" and path == "fast")
    sizes = adapter_tensors(shape, lora)
    base = Breakdown(model=name, mode=mode, batch=batch, seq=seq, weights=weight_bytes(shape, mode, a),
                     adapters=4.0 * sum(sizes), optimizer=optimizer_bytes(sizes, optimizer),
                     trainable_params=sum(sizes), layers=shape.layers, path=path, packed=packed)
    step = _Step(shape, lora, batch, seq, a, fused_loss, not packed if padded is None else padded, packed,
                 grad_accum, fused_optimizer, path)
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

    def planned(self, base: Breakdown, budget_bytes: float) -> Breakdown:
        """checkpointing=auto on the fast path: the plan thinktune.memory_plan makes, estimated here."""
        from thinktune import memory_plan

        shape, tokens = self.shape, self.batch * self.seq
        embedding = 0 if shape.tie else shape.vocab * shape.hidden * self.a
        plan_shape = memory_plan.ModelShape(shape.hidden, shape.intermediate, shape.kv_dim, shape.layers, shape.vocab,
                                            base.mode == "qlora", embedding)
        static = int(base.weights + base.adapters + 3 * base.trainable_params * 4)  # as training.memory_plan counts it
        plan = memory_plan.plan_memory(plan_shape, tokens, static, int(budget_bytes), "auto")
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
        stored = [checkpoint if layer < recomputed else saved for layer in range(shape.layers)]
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

