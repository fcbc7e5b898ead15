"""Attention exported as one onnxruntime MultiHeadAttention node instead of the decomposed MatMul/Softmax chain.

torch's TorchScript exporter writes scaled_dot_product_attention as MatMul, Softmax and a scale computed at run
time from the query's shape (Shape -> Slice -> Cast -> Sqrt). onnxruntime's UNet fusions do not recognise that
pattern, and the float scale computed from a shape lands on the CPU, which stops CUDA graphs. Swapping diffusers'
attention processor for this one at export writes `com.microsoft.MultiHeadAttention` (fused, memory-efficient
kernels on CUDA; a plain kernel on the CPU) with the default scale 1/sqrt(head_dim), as diffusers' SDPA uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DOMAIN = "com.microsoft"
ATTENTION_KINDS = ("mha", "plain")


class FusedAttention(torch.autograd.Function):
    """softmax(q kᵀ / sqrt(d)) v on (batch, tokens, heads * d) tensors; exported as one MultiHeadAttention node."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
        b, n, inner = query.shape
        split = lambda t: t.reshape(b, t.shape[1], heads, inner // heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(query), split(key), split(value))
        return out.transpose(1, 2).reshape(b, n, inner)

    @staticmethod
    def symbolic(g, query, key, value, heads: int):
        out = g.op(f"{DOMAIN}::MultiHeadAttention", query, key, value, num_heads_i=heads)
        out.setType(query.type())
        return out


class FusedAttnProcessor:
    """diffusers' AttnProcessor2_0 with the attention product as FusedAttention (no attention masks: SD never uses them)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("fused attention export does not take attention masks; export with --attention plain")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            b, c, h, w = image_shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None or attn.norm_k is not None:
            raise ValueError("fused attention export does not take q/k norms; export with --attention plain")
        hidden_states = FusedAttention.apply(query, key, value, attn.heads)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if image_shape is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(*image_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def use_fused_attention(module: torch.nn.Module) -> bool:
    """Give every diffusers attention layer of module the fused processor; False when module has none."""
    if not hasattr(module, "set_attn_processor") or not getattr(module, "attn_processors", None):
        return False
    module.set_attn_processor(FusedAttnProcessor())
    return True

