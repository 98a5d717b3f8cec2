"""Rotary position embedding for a frozen layer's keys (every token) and queries (text rows only).

Bit-identical to the families' own ``apply_rotary_pos_emb``, which the fast layer cannot call because it ropes
queries and keys with different cos/sin rows.

RoPE turns each pair of dimensions ``(x0, x1)`` (``"half"``: i and i + d/2, Llama's ``rotate_half``;
``"interleaved"``: 2i and 2i + 1, GLM's pairs) into ``(x0 c0 - x1 s0, x1 c1 + x0 s1)``. Written as one product with a
per-position 2 x 2 table ``[[c0, -s0], [s1, c1]]`` and one addition of the two product columns, it takes two
element-wise operators instead of five (multiply, negate, concatenate, multiply, add): on a GPU a small prefill is
bound by kernel launches, and the table is built once per forward (`rope_table`) and shared by every frozen layer.
It rounds exactly like the usual formula: the same products (``x1 * -s0`` is ``-(x1 * s0)`` bit for bit), added
once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RopeTable(NamedTuple):
    """Per-position rotation tables, shaped to broadcast against ``(batch, heads, rows, pairs...)`` (`rope_table`)."""

    weights: torch.Tensor
    style: str

    @property
    def rotary_dim(self) -> int:
        return self.weights.shape[-1] * 2 if self.style == "half" else self.weights.shape[-3] * 2


def rope_table(cos: torch.Tensor, sin: torch.Tensor, style: str = "half") -> RopeTable:
    """The rotation table of cos/sin (batch, rows, rotary_dim), as transformers' rotary modules give them.

    ``"half"``: weights (batch, 1, rows, 2, 2, rotary_dim / 2) indexed [output half, input half, i];
    ``"interleaved"``: (batch, 1, rows, rotary_dim / 2, 2, 2) indexed [pair, output, input]."""
    if style == "half":
        half = cos.shape[-1] // 2
        c0, c1, s0, s1 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
        dim = -2
    else:
        c0, c1, s0, s1 = cos[..., 0::2], cos[..., 1::2], sin[..., 0::2], sin[..., 1::2]
        dim = -1
    weights = torch.stack((c0, -s0, s1, c1), dim=dim)
    shape = (*weights.shape[:-2], 2, 2, weights.shape[-1]) if style == "half" else (*weights.shape[:-1], 2, 2)
    return RopeTable(weights.view(shape).unsqueeze(1), style)


def take_rows(table: RopeTable, positions: torch.Tensor) -> RopeTable:
    """The table's rows at ``positions``: (width,) rows shared by every sample, or (batch, width) per sample."""
    weights = table.weights
    if positions.dim() == 1:
        return RopeTable(weights.index_select(2, positions), table.style)
    flat = weights.expand(positions.shape[0], *weights.shape[1:]).flatten(3)
    index = positions[:, None, :, None].expand(-1, 1, -1, flat.shape[-1])
    return RopeTable(torch.gather(flat, 2, index).view(*index.shape[:3], *weights.shape[3:]), table.style)


def apply_rope_table(x: torch.Tensor, table: RopeTable) -> torch.Tensor:
    """Rotary embedding for ``x`` (batch, heads, rows, dim) by ``table`` (rows aligned with x's); only the first
    ``table.rotary_dim`` dims of each head rotate (partial rotary), the rest pass through."""
    rotary_dim = table.rotary_dim
    partial = rotary_dim < x.shape[-1]
    rotated = x[..., :rotary_dim] if partial else x
    half = rotary_dim // 2
    if table.style == "half":  # pairs (i, i + half): [1, input half, i] against [output half, input half, i]
        first, second = (rotated.unflatten(-1, (1, 2, half)) * table.weights).unbind(-2)
    else:  # pairs (2i, 2i + 1): [i, 1, input] against [i, output, input]
        first, second = (rotated.unflatten(-1, (half, 1, 2)) * table.weights).unbind(-1)
    out = (first + second).flatten(-2)
    return torch.cat([out, x[..., rotary_dim:]], dim=-1) if partial else out


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str = "half") -> torch.Tensor:
    """Rotary embedding for ``x`` (batch, heads, seq, dim) with cos/sin (batch, seq, rotary_dim), as transformers.

    Bit-identical to the families' own ``apply_rotary_pos_emb``: ``style`` ``"half"`` (Llama's ``rotate_half``) or
    ``"interleaved"`` (GLM's pairs); only the first ``rotary_dim`` dims rotate (partial rotary), the rest pass."""
    return apply_rope_table(x, rope_table(cos, sin, style))
