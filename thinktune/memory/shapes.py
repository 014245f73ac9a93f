"""Memory shapes and constants: the widths of a model that memory depends on, the R1 presets, the cards.

`ModelShape.from_config` reads a transformers config (a config.json dict, or the config object of a
loaded model). The constants every memory figure shares (CUDA context, allocator slack, workspaces,
the fused loss's chunk budget, the planner's margin) are defined here once. Arithmetic only: this
module never imports torch, never reads a file and never loads weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from thinktune.errors import UserError

GIB = 2**30

CUDA_CONTEXT_BYTES = 0.5 * GIB
"""CUDA context + loaded kernels (lazy loading): on the card but not in max_memory_allocated."""
ALLOCATOR_SLACK = 0.03
"""Fraction of the peak the caching allocator holds beyond it (fragmentation: reserved - allocated);
the runtime planner keeps a similar margin (PLAN_MARGIN_*). bench/estimate_check.py measures it."""
WORKSPACE_BYTES = 64 * 2**20
"""cuBLAS/cuBLASLt workspaces: allocated through PyTorch's allocator, so inside max_memory_allocated."""
FUSED_CE_CHUNK_BUDGET = 256 * 2**20
"""Mirror of kernels.fused_ce.DEFAULT_CHUNK_BYTES (checked equal by the tests; not imported: no torch here)."""
CE_TRANSIENT_BYTES = int(1.5 * FUSED_CE_CHUNK_BUDGET)
"""What the runtime planner reserves for the chunked linear cross-entropy: 1.5x its float32 logits budget."""
PLAN_MARGIN_FRACTION, PLAN_MARGIN_BYTES = 0.02, 128 * 2**20
"""The runtime planner's margin for allocator fragmentation and cuBLAS workspaces: 2% of the budget + 128 MiB."""

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
    def from_config(cls, config: Any) -> "ModelShape":
        """Read a transformers config.json dict or config object (nested `text_config` too).

        Raises UserError when it is not a dense decoder."""
        if not isinstance(config, dict):
            config = config.to_dict()
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

