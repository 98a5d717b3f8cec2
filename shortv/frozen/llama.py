"""Compute-skipping ShortV layer for Llama-shaped decoder layers (Llama, Mistral, Qwen2, Qwen2-VL, Qwen2.5-VL).

Layer shape: pre-norm, attention with q/k/v/o projections and rotary positions, residual, pre-norm gated MLP,
residual. In a frozen layer:
- every token gets its keys and values (text queries attend to the image; the KV cache is filled as usual),
- only text tokens get queries, attention output, ``o_proj``, the MLP and residual updates,
- visual hidden states leave the layer untouched.
Rows fed to ``q_proj``, ``o_proj`` and the MLP are exactly the text tokens of the batch, whatever their layout.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .._compat import cache_from_kwargs
from ..layout import TokenLayout
from .hooks import call_attention_hooks, has_forward_hooks

SUPPORTED_ATTENTION = ("sdpa", "eager")
_REQUIRED = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
_REQUIRED_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx")


def unsupported_reason(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot take the fast path, or None when it can."""
    missing = [name for name in _REQUIRED if not hasattr(layer, name)]
    missing += [f"self_attn.{name}" for name in _REQUIRED_ATTENTION if not hasattr(getattr(layer, "self_attn", None), name)]
    if missing:
        return f"{type(layer).__name__} is not Llama-shaped (missing {', '.join(missing)})"
    attention = attention_implementation(layer)
    if attention not in SUPPORTED_ATTENTION:
        return (
            f"attn_implementation={attention!r} is not supported by the fast ShortV layer (supported: "
            f"{', '.join(SUPPORTED_ATTENTION)}); load the model with attn_implementation='sdpa' or use mode='reference'"
        )
    return None


def attention_implementation(layer: nn.Module) -> str | None:
    return getattr(getattr(layer.self_attn, "config", None), "_attn_implementation", None)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding for ``x`` of shape (batch, heads, seq, dim) with cos/sin of shape (batch, seq, dim).

    Rounds exactly as transformers' ``x * cos + rotate_half(x) * sin`` (each product in the promoted dtype, then
    the sum), but writes the rotated half straight into one buffer instead of building it with a ``cat``: a frozen
    layer ropes every key, and on long image prompts (2880 visual tokens) that element-wise work is a visible share
    of the layer. Under autograd it falls back to the plain formula, since ``out=`` does not record gradients, and
    under ``torch.compile`` too.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    # Compilers fuse the plain formula themselves, and functionalization mishandles ``out=`` into views (aot_eager
    # returned wrong values), so under torch.compile the plain formula is both faster and correct.
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad)
    ):
        return (x * cos) + (_rotate_half(x) * sin)
    half = x.shape[-1] // 2
    rotated_sin = x.new_empty(torch.broadcast_shapes(x.shape, sin.shape), dtype=torch.promote_types(x.dtype, sin.dtype))
    # rotate_half(x) * sin == cat(-x2 * sin1, x1 * sin2); negating after the product rounds the same.
    torch.mul(x[..., half:], sin[..., :half], out=rotated_sin[..., :half]).neg_()
    torch.mul(x[..., :half], sin[..., half:], out=rotated_sin[..., half:])
    return (x * cos).add_(rotated_sin)


def _gather_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x[b, positions[b, j]]`` for x of shape (batch or 1, seq, dim)."""
    x = x.expand(positions.shape[0], *x.shape[1:])
    return torch.gather(x, 1, positions.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _text_query_mask(
    attention_mask: torch.Tensor | None,
    layout: TokenLayout,
    past_length: int,
    kv_length: int,
    implementation: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The rows of the layer's 4-D attention mask that belong to the text queries.

    When transformers passed no mask (sdpa's causal fast case), the causal mask is built explicitly: the text
    queries are a subset, so sdpa's ``is_causal`` alignment no longer applies.
    """
    positions = layout.text_positions
    batch, width = positions.shape
    if attention_mask is None:
        query_index = (positions + past_length).unsqueeze(-1)
        key_index = torch.arange(kv_length, device=positions.device)
        allowed = (key_index <= query_index).unsqueeze(1)
        if implementation == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        raise TypeError(
            f"the fast ShortV layer expects a 4-D attention mask tensor, got {type(attention_mask).__name__}"
        )
    mask = attention_mask.expand(batch, attention_mask.shape[1], attention_mask.shape[2], attention_mask.shape[3])
    index = positions[:, None, :, None].expand(batch, mask.shape[1], width, mask.shape[3])
    return torch.gather(mask, 2, index)


def _attention_function(layer: nn.Module) -> Callable[..., Any]:
    implementation = attention_implementation(layer)
    if implementation not in SUPPORTED_ATTENTION:
        raise RuntimeError(unsupported_reason(layer))
    # The family's own eager kernel lives next to its attention class in transformers.
    eager = getattr(sys.modules[type(layer.self_attn).__module__], "eager_attention_forward")
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)


def fast_frozen_forward(
    layer: nn.Module,
    layout: TokenLayout,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    use_cache: bool | None = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    attn = layer.self_attn
    cache = cache_from_kwargs(kwargs)
    kwargs.pop("cache", None)
    kwargs.pop("past_key_values", None)
    if position_embeddings is None:
        raise RuntimeError("the fast ShortV layer needs `position_embeddings` (cos, sin) from the decoder")
    cos, sin = position_embeddings
    if cos.dim() != 3:
        raise RuntimeError(f"expected per-token cos/sin of shape (batch, seq, dim), got {tuple(cos.shape)}")

    batch, seq, _ = hidden_states.shape
    positions = layout.text_positions
    width = positions.shape[1]
    head_dim = attn.head_dim

    normed = layer.input_layernorm(hidden_states)
    # Keys and values for every token, from the (frozen) current states.
    keys = attn.k_proj(normed).view(batch, seq, -1, head_dim).transpose(1, 2)
    values = attn.v_proj(normed).view(batch, seq, -1, head_dim).transpose(1, 2)
    keys = _apply_rope(keys, cos.expand(batch, -1, -1), sin.expand(batch, -1, -1))
    past_length = cache.get_seq_length(attn.layer_idx) if cache is not None else 0
    if cache is not None:
        keys, values = cache.update(keys, values, attn.layer_idx, kwargs=kwargs)

    # Queries for text tokens only: flat rows through q_proj, then into a (batch, width) grid for attention.
    queries = layout.to_grid(attn.q_proj(layout.take_text(normed)))
    queries = queries.view(batch, width, -1, head_dim).transpose(1, 2)
    queries = _apply_rope(queries, _gather_rows(cos, positions), _gather_rows(sin, positions))

    implementation = attention_implementation(layer)
    mask = _text_query_mask(attention_mask, layout, past_length, keys.shape[2], implementation, queries.dtype)
    attention_output, weights = _attention_function(layer)(
        attn,
        queries,
        keys,
        values,
        mask,
        dropout=0.0 if not attn.training else attn.attention_dropout,
        scaling=attn.scaling,
        sliding_window=getattr(attn, "sliding_window", None),
        position_ids=position_ids,
        **kwargs,
    )
    attention_output = attn.o_proj(layout.from_grid(attention_output.reshape(batch, width, -1)))
    if has_forward_hooks(attn):  # output_attentions and user hooks on the attention module
        call_attention_hooks(attn, layout, attention_output, weights, {"hidden_states": normed, **kwargs})

    text_states = layout.take_text(hidden_states) + attention_output
    text_states = text_states + layer.mlp(layer.post_attention_layernorm(text_states))
    return layout.put_text(hidden_states, text_states)
