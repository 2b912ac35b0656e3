"""Attention over packed sequences computed one sequence at a time, for CPUs.

A packed batch flattened into one row (``cu_seq_lens_q``, as for flash-attention's variable-length
kernels) is attended sequence by sequence: causal attention inside each sequence, none across them, and
no work on the masked blocks that a block-diagonal mask over whole rows computes and throws away, nor on
padding. The forward pass is PyTorch's fused CPU kernel per sequence; the backward pass recomputes each
sequence's attention probabilities with plain matmuls (the fused kernel's own backward is the slowest part
of attention on CPUs) and keeps only the inputs and the output between the passes. On the embedded
model's packed rows (4 x 512 tokens, 2 cores): 45 ms forward and backward per layer against 65 ms for
the block-diagonal mask.

Registered with transformers as the attention implementation ``PACKED_SDPA``; without ``cu_seq_lens_q``
(padded batches, generation), and for sliding-window layers, soft-capped scores or attention sinks, it is
transformers' sdpa with the usual masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACKED_SDPA = "medgpt_packed_sdpa"


class PackedCausalAttention(torch.autograd.Function):
    """query [1, heads, tokens, dim], key/value [1, kv_heads, tokens, dim]; ``lengths`` the sequences' token
    counts in order (summing to tokens). Returns [1, heads, tokens, dim]."""

    @staticmethod
    def forward(ctx, query, key, value, lengths: list[int], scale: float):
        parts = zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
        out = torch.cat([F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                        enable_gqa=q.shape[1] != k.shape[1])
                         for q, k, v in parts], 2)
        ctx.save_for_backward(query, key, value, out)
        ctx.lengths, ctx.scale = lengths, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out = ctx.saved_tensors
        grad_out = grad_out.to(out.dtype)
        heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[-1]
        group = heads // kv_heads  # query heads per key/value head (grouped-query attention)
        exact = torch.promote_types(query.dtype, torch.float32)  # softmax and its gradient: fp32 at least
        grad_query, grad_key, grad_value = (torch.empty_like(t) for t in (query, key, value))
        longest = max(ctx.lengths)  # each sequence's causal mask is the top-left corner of this one
        future_of_longest = torch.ones(longest, longest, dtype=torch.bool, device=query.device).triu(1)
        start = 0
        for length in ctx.lengths:
            span = slice(start, start + length)
            # one key/value head's query heads stacked as rows: [kv_heads, group * length, dim]
            q = query[0, :, span].reshape(kv_heads, group * length, dim) * ctx.scale
            k, v = key[0, :, span], value[0, :, span]
            d_out = grad_out[0, :, span].reshape(kv_heads, group * length, dim)
            # the probabilities again (softmax in fp32), then the gradients: d_scores = p * (dp - rowsum(dO * O))
            scores = q @ k.transpose(-1, -2)
            future = future_of_longest[:length, :length]
            scores.view(kv_heads, group, length, length).masked_fill_(future, float("-inf"))
            probs = scores.softmax(-1, dtype=exact)
            carried = (d_out.to(exact) * out[0, :, span].reshape(kv_heads, group * length, dim)).sum(-1, True)
            d_scores = (d_out @ v.transpose(-1, -2)).to(exact).sub_(carried).mul_(probs).to(q.dtype)
            grad_value[0, :, span] = probs.to(q.dtype).transpose(-1, -2) @ d_out
            grad_query[0, :, span] = (d_scores @ k).reshape(heads, length, dim) * ctx.scale
            grad_key[0, :, span] = d_scores.transpose(-1, -2) @ q
            start += length
        return grad_query, grad_key, grad_value, None, None


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, **kwargs):
    """transformers' attention-function signature; returns (output [batch, tokens, heads, dim], None)."""
    lengths = kwargs.get("cu_seq_lens_q")
    # what this path does not compute (sliding windows, soft-capped scores, attention sinks) goes to sdpa, which
    # gets the block-diagonal mask transformers makes from the restarted position_ids
    other = kwargs.get("sliding_window") or kwargs.get("softcap") or kwargs.get("s_aux") is not None
    if lengths is None or other or query.shape[0] != 1 or dropout > 0 or key.shape[2] != query.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # one dtype for the three, as sdpa's autocast rule gives (rotary embeddings can leave q/k in fp32, v in bf16)
    dtype = torch.get_autocast_dtype(query.device.type) if torch.is_autocast_enabled(query.device.type) else query.dtype
    query, key, value = (t.to(dtype) for t in (query, key, value))
    out = PackedCausalAttention.apply(query, key, value, lengths.diff().tolist(), scale)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Makes ``PACKED_SDPA`` a transformers attention implementation (masks as sdpa's); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA
