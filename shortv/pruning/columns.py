"""Cutting a decoder layer's per-token arguments down to the kept columns (original positions, masks, RoPE rows)."""

from __future__ import annotations

from typing import Any

import torch


def gather_columns(x: torch.Tensor, dim: int, columns: torch.Tensor, batch_dim: int = 0) -> torch.Tensor:
    """``x`` with its sequence dimension ``dim`` cut to ``columns`` (batch, kept), per sample along ``batch_dim``
    (a batch of 1, e.g. shared cos/sin rows, is broadcast first)."""
    dim, batch_dim = dim % x.dim(), batch_dim % x.dim()
    shape = list(x.shape)
    shape[batch_dim] = columns.shape[0]
    x = x.expand(shape)
    view = [1] * x.dim()
    view[batch_dim], view[dim] = columns.shape
    shape[dim] = columns.shape[1]
    return x.gather(dim, columns.view(view).expand(shape))


def prefill_kwargs(kwargs: dict[str, Any], columns: torch.Tensor) -> dict[str, Any]:
    """The layer arguments of a pruned prefill: rotary rows, position ids, mask rows and columns at ``columns``.

    An absent mask is the causal mask (sdpa's fast case): on ascending kept columns it is causal again."""
    out = dict(kwargs)
    if kwargs.get("position_embeddings") is not None:  # (cos, sin), each (batch or 1, seq, dim)
        out["position_embeddings"] = tuple(gather_columns(x, -2, columns, -3) for x in kwargs["position_embeddings"])
    if kwargs.get("position_ids") is not None:  # (batch, seq) or (sections, batch, seq)
        out["position_ids"] = gather_columns(kwargs["position_ids"], -1, columns, -2)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        out["attention_mask"] = gather_columns(gather_columns(mask, -1, columns), -2, columns)
    return out


def decode_kwargs(kwargs: dict[str, Any], key_columns: torch.Tensor, past_length: int, seq: int) -> dict[str, Any]:
    """The layer arguments of a step after a pruned prompt: the new tokens are all kept, so only the mask's key
    columns shrink to ``key_columns`` (batch, cached + new) -- the positions the layer's KV cache holds. An absent
    mask over several new tokens becomes an explicit causal mask (sdpa's ``is_causal`` would align it wrongly)."""
    out = dict(kwargs)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        out["attention_mask"] = gather_columns(mask, -1, key_columns)
    elif seq > 1:
        queries = torch.arange(past_length, past_length + seq, device=key_columns.device)
        out["attention_mask"] = (key_columns[:, None, None, :] <= queries[None, None, :, None])
    return out
