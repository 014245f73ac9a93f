"""Activation formulas, per training path: what one decoder layer keeps for backward, its transient
peak, and the LM head + loss.

Two paths, as setup.prepare_model builds them: "fast" (thinktune.fastpath: one-node LoRA projections,
SwiGLU and RMSNorm, packed per-document attention) and "peft" (PEFT LoRA layers, transformers
modules). `layer_saved_per_token` / `layer_transient_per_token` / `loss_bytes` are the estimator's
exact accounting (checked against what autograd saves); `layer_bytes` / `checkpoint_bytes` /
`transient_bytes` are the runtime planner's per-micro-batch figures for the fast path (calibrated
on the 7B benchmark). Arithmetic only: never imports torch, never touches a model.
"""
from __future__ import annotations

from thinktune.config import LoraConfig
from thinktune.memory.shapes import CE_TRANSIENT_BYTES, FUSED_CE_CHUNK_BUDGET, ModelShape



def layer_saved_per_token(shape: ModelShape, lora: LoraConfig, act_bytes: int, seq: int, padded: bool,
                          path: str = "fast", casts_input: bool = True, packed: bool = False,
                          dropout_mask_bytes: int = 1) -> dict[str, float]:
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
        # the fused MLP keeps its input; unfused (LoRA dropout), only gate/up adapters keep it
        mlp_input = lora.dropout == 0 or any(t in targets for t in ("gate_proj", "up_proj"))
        terms.update({"norms (input, 1/rms)": 2 * (a * h + 4), "attention input": a * h if qkv else 0,
                      "MLP input": a * h if mlp_input else 0, "MLP gate, up": 2 * a * i})
        if lora.dropout > 0:
            terms["LoRA dropout (dropped inputs, masks, unfused MLP)"] = dropout_saved_per_token(
                shape, lora, a, dropout_mask_bytes)
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


def dropout_saved_per_token(shape: ModelShape, lora: LoraConfig, act_bytes: int, mask_bytes: int = 1) -> int:
    """What LoRA dropout adds per token on the fast path (the estimator and the planner both add it).

    Each adapted projection keeps its dropped input for A's gradient (a * in) and dropout's mask
    (m * in: m = 1 on CUDA, where native_dropout keeps a bool mask; on the CPU dropout multiplies by a
    mask in the input's dtype, m = a); the MLP runs unfused (its projections one by one), so it also
    keeps the SiLU output and the product that enters down_proj (2 a I). in = H for q, k, v, gate,
    up; Q for o; I for down. Checked against what autograd saves on the CPU (tests/memory).
    """
    widths = {name: fan_in for name, (fan_in, _, _) in shape.projections().items()}
    dropped = sum((act_bytes + mask_bytes) * widths[t] for t in lora.target_modules if t in widths)
    return dropped + 2 * act_bytes * shape.intermediate


# ----------------------------------------------------------------------------- the runtime planner's figures (fast path)

def layer_bytes(shape: ModelShape, tokens: int, dtype_bytes: int = 2, lora: LoraConfig | None = None) -> int:
    """Activations one decoder layer keeps for backward without recomputation (fast path).

    Attention: the norm's input, the projections' input, q/k/v and the attention output
    (4 H + 2 kv); MLP: the norm's input, the projections' input, gate and up outputs (2 H + 2 I).
    Measured on the 7B at 2 x 2048 (H200, bench/bench_train.py): 0.45 GiB per layer; this gives 0.46.
    With LoRA dropout, plus `dropout_saved_per_token`.
    """
    per_token = (6 * shape.hidden + 2 * shape.kv_dim + 2 * shape.intermediate) * dtype_bytes
    if lora is not None and lora.dropout > 0:
        per_token += dropout_saved_per_token(shape, lora, dtype_bytes)
    return per_token * tokens


def compiled_layer_bytes(shape: ModelShape, tokens: int, dtype_bytes: int = 2) -> int:
    """What torch.compile adds to a kept (not recomputed) layer: inductor's partition of the layer's
    forward and backward saves one more intermediate-width tensor than the eager autograd nodes.
    Measured on the 7B at 2 x 2048 (H200, 2026-12-01): 24.75 vs 22.58 GiB peak with 15 kept layers,
    32.30 vs 28.27 with 28 kept, i.e. 0.145 GiB per kept layer; this gives I * T * 2 = 0.145. A
    recomputed layer's saved set lives one layer at a time, so it adds nothing measurable (15.27 GiB
    with all 28 recomputed and compiled, inside the uncompiled estimate)."""
    return shape.intermediate * tokens * dtype_bytes


def checkpoint_bytes(shape: ModelShape, tokens: int, dtype_bytes: int = 2) -> int:
    """What a recomputed layer keeps: its input."""
    return shape.hidden * tokens * dtype_bytes


def transient_bytes(shape: ModelShape, tokens: int, any_checkpointed: bool, quantized: bool = False,
                    dtype_bytes: int = 2, lora: LoraConfig | None = None) -> int:
    """Short-lived peaks on top of what is kept: an MLP's backward temporaries, plus one layer's
    recompute (or, without recomputation, the loss head). Measured 0.9 GiB either way on the 7B
    at 2 x 2048; this gives 0.9 and 1.0. A 4-bit base adds one dequantised MLP weight."""
    flowing = 3 * shape.hidden * tokens * dtype_bytes  # residual stream, its gradient, the final norm
    loss_head = CE_TRANSIENT_BYTES + shape.hidden * tokens * dtype_bytes
    mlp_backward = 3 * shape.intermediate * tokens * dtype_bytes
    dequantised = shape.intermediate * shape.hidden * dtype_bytes if quantized else 0
    recompute = layer_bytes(shape, tokens, dtype_bytes, lora) if any_checkpointed else loss_head
    return flowing + mlp_backward + dequantised + recompute
