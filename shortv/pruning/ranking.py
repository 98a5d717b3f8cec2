"""FastV's ranking: the attention each visual token receives in layer K - 1, recomputed from that layer's q and k.

Whatever attention backend the model runs (sdpa keeps no attention matrix), the scores are recomputed here for the
ranking queries only: the last prompt token (``rank="last"``, FastV's released code) or every non-padding token
(``rank="mean"``, the paper's wording). Queries and keys are built as the layer builds them (input norm, q/k
projections, per-head q/k norms, RoPE with the decoder's cos/sin rows, grouped-query heads repeated), the layer's
own attention mask is applied, the softmax is taken in fp32, and the result is averaged over heads and queries.
A layer that scales its queries by position (Ministral 3's Llama-4 scale) gets the scale at the ranking queries'
positions.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from ..frozen.anatomy import LayerAnatomy
from ..frozen.common import _heads, _llama4_query_scale, _query_heads, gather_rows
from ..frozen.rope import apply_rope


def _query_rows(seq: int, batch: int, rank: str, padding: torch.Tensor | None, device) -> torch.Tensor:
    """(batch, rows) positions whose queries rank the visual tokens."""
    if rank == "last":
        if padding is None:
            return torch.full((batch, 1), seq - 1, device=device)
        # The last real token of each sample (right padding puts pads after it).
        index = torch.arange(seq, device=device).expand(batch, -1)
        return torch.where(padding.bool().to(device), index, -1).amax(dim=1, keepdim=True)
    return torch.arange(seq, device=device).expand(batch, -1)


def received_attention(
    layer: nn.Module,
    anatomy: LayerAnatomy,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    rank: str,
    padding: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(batch, seq) attention each column receives in ``layer`` (its input ``hidden_states``), averaged over heads
    and over the ranking queries. ``padding``: the model's 2-D attention mask (1 = real token), if it had one;
    ``position_ids``: the layer's, for a query scale by position."""
    attention = getattr(layer, anatomy.attention)
    batch, seq = hidden_states.shape[:2]
    normed = getattr(layer, anatomy.input_norm)(hidden_states)
    cos, sin = position_embeddings
    rows = _query_rows(seq, batch, rank, padding, hidden_states.device)
    queries, _ = _query_heads(attention, anatomy, gather_rows(normed, rows))
    queries = apply_rope(queries.transpose(1, 2), gather_rows(cos, rows), gather_rows(sin, rows), anatomy.rope)
    if anatomy.query_scale == "llama4":  # the ranking rows stand for the text positions of a frozen layer's layout
        queries = queries * _llama4_query_scale(attention, position_ids, SimpleNamespace(text_positions=rows))
    keys = _heads(attention, attention.k_proj(normed), "k_norm" if anatomy.qk_norm else None)
    keys = apply_rope(keys.transpose(1, 2), cos.expand(batch, -1, -1), sin.expand(batch, -1, -1), anatomy.rope)
    keys = keys.repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)
    scores = (queries.float() @ keys.float().transpose(-1, -2)) * attention.scaling  # (batch, heads, rows, seq)
    if attention_mask is None:  # sdpa's causal fast case
        allowed = (torch.arange(seq, device=rows.device)[None, None, :] <= rows[:, :, None]).unsqueeze(1)
    else:
        mask = attention_mask[..., :seq].expand(batch, -1, -1, -1)  # a static cache's mask spans its whole buffer
        mask = torch.gather(mask, 2, rows[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
        allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    received = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1).mean(dim=1)  # (batch, rows, seq)
    if rank == "last":
        return received[:, 0]
    real = torch.ones(batch, seq, device=rows.device) if padding is None else padding.to(rows.device).float()
    # A padding query may see no key at all (a row of -inf, NaN after the softmax): it counts for nothing.
    received = torch.where(real[:, :, None] > 0, received, 0.0)
    return received.sum(dim=1) / real.sum(dim=1, keepdim=True)


def top_visual(received: torch.Tensor, visual: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(batch, seq) bool: the ``keep[b]`` visual columns of each sample that receive the most attention."""
    order = received.masked_fill(~visual, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return visual & (rank < keep[:, None])


def kept_layout(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows layers K.. run: ``(columns, real)``, both (batch, width), from the (batch, seq) bool ``keep``.

    ``columns`` holds each sample's kept columns ascending, at the end of the row; a sample that keeps fewer than
    the widest one gets padding slots first (some dropped column, which the layers' masks hide; ``real`` False
    there). ``real`` is None when every sample keeps as many columns (no padding slot)."""
    counts = keep.sum(dim=1)
    width = int(counts.max())
    # A stable sort puts the dropped columns first and the kept ones last, each in ascending order.
    columns = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, keep.shape[1] - width :]
    if bool((counts == width).all()):
        return columns, None
    return columns, keep.gather(1, columns)
