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


def _hide_padding(mask: torch.Tensor | None, real_keys: torch.Tensor, query_columns: torch.Tensor,
                  key_columns: torch.Tensor, pad_queries: torch.Tensor | None) -> torch.Tensor:
    """``mask`` (4-D, bool or additive; None: causal by column) with the padding keys hidden; a padding query
    (``pad_queries``, (batch, query) bool) sees itself, so that its row stays finite."""
    if mask is None:
        mask = key_columns[:, None, None, :] <= query_columns[:, None, :, None]
    hidden = ~real_keys[:, None, None, :]
    self_only = None
    if pad_queries is not None:
        eye = torch.eye(mask.shape[-2], mask.shape[-1], dtype=torch.bool, device=mask.device)
        self_only = pad_queries[:, None, :, None] & eye
    if mask.dtype == torch.bool:
        mask = mask & ~hidden
        return mask | self_only if self_only is not None else mask
    mask = mask.masked_fill(hidden, torch.finfo(mask.dtype).min)
    return mask.masked_fill(self_only, 0) if self_only is not None else mask


def _empty_slots(mask: torch.Tensor, key_slots: int | None) -> torch.Tensor:
    """``mask`` with hidden key columns appended up to ``key_slots``: a static cache's unwritten slots."""
    missing = 0 if key_slots is None else key_slots - mask.shape[-1]
    if missing <= 0:
        return mask
    fill = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
    return torch.cat([mask, mask.new_full((*mask.shape[:-1], missing), fill)], dim=-1)


def prefill_kwargs(kwargs: dict[str, Any], columns: torch.Tensor, real: torch.Tensor | None,
                   key_slots: int | None = None, recurrent: bool = False, per_token: tuple[str, ...] = (),
                   rows: int | None = None) -> dict[str, Any]:
    """The layer arguments of a pruned prefill: rotary rows, position ids, mask rows and columns at ``columns``;
    padding slots (``real`` False) are hidden from every query, and so are a static cache's slots past the kept
    ones (``key_slots``: how many keys the layer's cache returns; None: as many as it holds). ``per_token``: names
    of further (batch, seq, ...) arguments cut the same way (Gemma 4's per-layer input).

    ``rows``: how many query rows the layer gets, when the model passed it only its last ones (Gemma 4 past its
    KV-sharing point, under ``logits_to_keep``): their arguments, already cut by the model to the prompt's last
    ``rows`` columns, are kept (the caller checks that those are the last kept columns); the mask's key columns
    are cut to ``columns`` (the keys the layer reads cover every kept column).

    An absent mask is the causal mask (sdpa's fast case): on ascending kept columns it is causal again.
    ``recurrent``: a linear-attention layer, whose mask is the 2-D padding mask (None: no padding) that zeroes its
    padding rows before they enter its conv and recurrent states: cut to the columns, padding slots zeroed too."""
    out = dict(kwargs)
    sliced = rows is not None and rows < columns.shape[1]
    queries = columns[:, -rows:] if sliced else columns

    def cut(x: torch.Tensor, dim: int, batch_dim: int = 0) -> torch.Tensor:
        return x if sliced and x.shape[dim] == rows else gather_columns(x, dim, queries, batch_dim)

    for name in per_token:
        if kwargs.get(name) is not None:
            out[name] = cut(kwargs[name], 1)
    if kwargs.get("position_embeddings") is not None:  # (cos, sin), each (batch or 1, seq, dim)
        out["position_embeddings"] = tuple(cut(x, -2, -3) for x in kwargs["position_embeddings"])
    if kwargs.get("position_ids") is not None:  # (batch, seq) or (sections, batch, seq)
        out["position_ids"] = cut(kwargs["position_ids"], -1, -2)
    mask = kwargs.get("attention_mask")
    if recurrent:
        if mask is not None:
            mask = gather_columns(mask, -1, columns)
        if real is not None:
            mask = real if mask is None else mask.masked_fill(~real, 0)
        out["attention_mask"] = mask
        return out
    if mask is not None:
        mask = cut(gather_columns(mask, -1, columns), -2)
    if real is not None:
        mask = _hide_padding(mask, real, queries, columns, None if sliced else ~real)
    if key_slots is not None:
        if mask is None:
            mask = columns[:, None, None, :] <= queries[:, None, :, None]
        mask = _empty_slots(mask, key_slots)
    out["attention_mask"] = mask
    return out


def decode_kwargs(kwargs: dict[str, Any], key_columns: torch.Tensor, real_keys: torch.Tensor | None,
                  past_length: int, seq: int, key_slots: int | None = None) -> dict[str, Any]:
    """The layer arguments of a step after a pruned prompt: the new tokens are all kept, so only the mask's key
    columns shrink to ``key_columns`` (batch, cached + new) -- the positions the layer's KV cache holds; padding
    slots (``real_keys`` False) and a static cache's unwritten slots (up to ``key_slots``) are hidden. An absent
    mask over several new tokens becomes an explicit causal mask (sdpa's ``is_causal`` would align it wrongly)."""
    out = dict(kwargs)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        mask = gather_columns(mask, -1, key_columns)
    queries = torch.arange(past_length, past_length + seq, device=key_columns.device).expand(len(key_columns), -1)
    if real_keys is not None:
        mask = _hide_padding(mask, real_keys, queries, key_columns, None)
    elif mask is None and (seq > 1 or key_slots is not None):
        mask = key_columns[:, None, None, :] <= queries[:, None, :, None]
    out["attention_mask"] = mask if key_slots is None else _empty_slots(mask, key_slots)
    return out


def window_decode_mask(padding: torch.Tensor | None, key_columns: torch.Tensor, real_keys: torch.Tensor | None,
                       past_length: int, seq: int, window: int | None) -> torch.Tensor:
    """A step's (batch, 1, seq, keys) bool mask for a layer from K on whose cache returns the keys at
    ``key_columns`` (a sliding-window layer: its last kept positions, then the new ones): causal and within
    ``window`` (None: no window) by original column, the forward's 2-D ``padding`` (None: none) and the padding
    slots (``real_keys`` False) hidden. For when the model laid its own mask out for another layer's cache (the
    unpruned sliding layers', or a pruned first full-attention layer's)."""
    queries = torch.arange(past_length, past_length + seq, device=key_columns.device).expand(len(key_columns), -1)
    distance = queries[:, None, :, None] - key_columns[:, None, None, :]
    mask = (distance >= 0) if window is None else (distance >= 0) & (distance < window)
    if padding is not None:
        mask = mask & padding.to(key_columns.device).bool().gather(1, key_columns)[:, None, None, :]
    return mask if real_keys is None else mask & real_keys[:, None, None, :]
