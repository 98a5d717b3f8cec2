"""Rotary position embedding for a frozen layer's keys (every token) and queries (text rows only).

Bit-identical to the families' own ``apply_rotary_pos_emb``, which the fast layer cannot call because it ropes
queries and keys with different cos/sin rows.
"""

from __future__ import annotations

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def _rope_half_inplace(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin``, rounding exactly like it, with the rotated half written into one buffer.

    A frozen layer ropes every key, and on long image prompts that element-wise work is a visible share of the
    layer, so the ``cat`` of ``rotate_half`` is avoided.
    """
    half = x.shape[-1] // 2
    # cos/sin broadcast to x (batch, heads, seq, dim), so the buffer has x's shape (torch.broadcast_shapes, a
    # Python-level reference op, cost more host time than these small products).
    rotated_sin = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, sin.dtype))
    # rotate_half(x) * sin == cat(-x2 * sin1, x1 * sin2); negating after the product rounds the same.
    torch.mul(x[..., half:], sin[..., :half], out=rotated_sin[..., :half]).neg_()
    torch.mul(x[..., :half], sin[..., half:], out=rotated_sin[..., half:])
    return (x * cos).add_(rotated_sin)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str = "half") -> torch.Tensor:
    """Rotary embedding for ``x`` (batch, heads, seq, dim) with cos/sin (batch, seq, rotary_dim), as transformers.

    Bit-identical to the families' own ``apply_rotary_pos_emb``: ``style`` ``"half"`` (Llama's ``rotate_half``) or
    ``"interleaved"`` (GLM's pairs); only the first ``rotary_dim`` dims rotate (partial rotary), the rest pass.
    The buffer-writing variant is used only on the CPU (it saves memory traffic there; on a GPU, where a small
    prefill is bound by kernel launches, it would launch more kernels than the plain formula), outside autograd
    (``out=`` records no gradients) and outside ``torch.compile`` (functionalization mishandles ``out=`` into
    views: aot_eager returned wrong values; compilers fuse the plain formula themselves).
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotary_dim = cos.shape[-1]
    partial = rotary_dim < x.shape[-1]
    rotated, passed = (x[..., :rotary_dim], x[..., rotary_dim:]) if partial else (x, None)
    plain = torch.compiler.is_compiling() or x.device.type != "cpu" or (
        torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad)
    )
    if style == "interleaved":
        out = (rotated * cos) + (_rotate_pairs(rotated) * sin)
    elif plain:
        out = (rotated * cos) + (_rotate_half(rotated) * sin)
    else:
        out = _rope_half_inplace(rotated, cos, sin)
    return torch.cat([out, passed], dim=-1) if partial else out
