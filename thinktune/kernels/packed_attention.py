"""Attention over a padding-free packed row: each document attends causally to itself only.

A packed micro-batch is one row [1, L] holding several documents back to back, with
position ids restarting at 0 for each. `packed_attention` runs causal scaled-dot-product
attention on each document's slice of q/k/v (PyTorch's fused SDPA, so the flash kernel on
CUDA, with grouped-query heads shared natively), never forming an L x L mask: the cost is
that of attending within documents, not across the whole row.

`packed_sdpa_attention` is the same thing behind transformers' attention-function interface
(module, query, key, value, attention_mask, scaling, dropout, **kwargs): with a
`document_lengths` kwarg (ints, or a host tensor of them) it attends per document; without it, it *is* transformers' own
`sdpa_attention_forward` (padding masks and all). Either way cuDNN's attention kernel is left
out (`TRAINING_BACKENDS`). thinktune.fastpath registers it under
`PACKED_ATTENTION` through transformers' public AttentionInterface / AttentionMaskInterface.

`reference_packed_attention` (a dense block-diagonal causal mask, plain math) is the
specification. Computes only; registers nothing by itself.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

PACKED_ATTENTION = "thinktune_packed_sdpa"
TRAINING_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
"""SDPA kernels for training shapes. cuDNN's attention is left out: it builds an execution plan
for every new sequence length, and training lengths change every step (on the H200, variable-length
steps ran 2.5x slower than fixed ones with it allowed)."""


def _check(query: torch.Tensor, key: torch.Tensor, lengths: Sequence[int]) -> None:
    if query.shape[0] != 1:
        raise ValueError(f"a packed row has batch size 1, got {query.shape[0]}")
    if sum(lengths) != query.shape[2] or any(n <= 0 for n in lengths):
        raise ValueError(f"document lengths {list(lengths)} must be positive and sum to the row length {query.shape[2]}")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} key/value heads")


def reference_packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               lengths: Sequence[int], scale: float | None = None) -> torch.Tensor:
    """The specification: softmax(q k^T * scale + block-diagonal causal mask) v in float32.

    query [1, Hq, L, D], key/value [1, Hkv, L, D] (Hq a multiple of Hkv); returns [1, Hq, L, D].
    """
    _check(query, key, lengths)
    groups = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(groups, dim=1)
    v = value.float().repeat_interleave(groups, dim=1)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(list(lengths))).to(query.device)
    pos = torch.arange(query.shape[2], device=query.device)
    allowed = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
    scores = query.float() @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(query.shape[-1]))
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).to(query.dtype)


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: Sequence[int],
                     scale: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Per-document causal attention on a packed row; same function as `reference_packed_attention`.

    query [1, Hq, L, D], key/value [1, Hkv, L, D]; `lengths` are the documents' token counts
    (Python ints summing to L). Returns [1, Hq, L, D].
    """
    _check(query, key, lengths)
    gqa = {"enable_gqa": True} if query.shape[1] != key.shape[1] else {}
    outputs, start = [], 0
    with sdpa_kernel(TRAINING_BACKENDS):
        for n in lengths:
            end = start + int(n)
            outputs.append(F.scaled_dot_product_attention(
                query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                is_causal=True, scale=scale, dropout_p=dropout, **gqa))
            start = end
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: per-document attention when `document_lengths` is given.

    Returns (attn_output [B, L, Hq, D], None) like transformers' sdpa_attention_forward, to
    which it defers for everything that is not a packed row.
    """
    lengths = kwargs.get("document_lengths")
    if lengths is None:
        from thinktune.compat import transformers_sdpa_attention

        with sdpa_kernel(TRAINING_BACKENDS):
            return transformers_sdpa_attention()(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
    out = _packed_attention_outside_graphs(query, key, value, lengths, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None


@torch.compiler.disable
def _packed_attention_outside_graphs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                     lengths: Sequence[int] | torch.Tensor, scale: float | None,
                                     dropout: float) -> torch.Tensor:
    """`packed_attention`, never traced by torch.compile: a compiled decoder layer breaks its graph here
    and calls this eagerly. Traced, the per-document loop would be unrolled and guarded on the lengths
    themselves (one recompile per distinct step); kept out, the layer's graphs see only the row length,
    which becomes a dynamic dimension. `lengths` may be a (host) tensor, as thinktune's loss passes it."""
    if isinstance(lengths, torch.Tensor):
        lengths = [int(n) for n in lengths.tolist()]
    return packed_attention(query, key, value, lengths, scale=scale, dropout=dropout)


def register_packed_attention() -> str:
    """Make `PACKED_ATTENTION` a valid attn_implementation (sdpa's masks, our function); return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    return PACKED_ATTENTION
