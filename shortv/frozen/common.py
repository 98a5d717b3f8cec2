"""Pieces every compute-skipping frozen layer shares: text-row gathers, the text-query mask, attention.

In a frozen layer every token gets its keys and values (text queries attend to the image, and the KV cache is
filled as usual), while only text tokens get queries, attention output, ``o_proj``, the MLP and residual updates;
visual hidden states leave the layer untouched. `text_attention` is that attention half for any softmax-attention
layer described by a `LayerAnatomy`; the fast layer modules add their residual structure around it.
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
from .anatomy import LayerAnatomy
from .hooks import call_attention_hooks, has_forward_hooks
from .rope import RopeTable, apply_rope_table, rope_table, take_rows

SUPPORTED_ATTENTION = ("sdpa", "eager")
_ATTENTION_ATTRIBUTES = ("head_dim", "scaling", "layer_idx")


def attention_implementation(attention: nn.Module) -> str | None:
    return getattr(getattr(attention, "config", None), "_attn_implementation", None)


def _shares_kv(attention: nn.Module, anatomy: LayerAnatomy) -> bool:
    """Whether this layer reads another layer's keys and values instead of projecting its own."""
    return anatomy.kv_sharing and bool(getattr(attention, "is_kv_shared_layer", False))


def attention_parts(attention: nn.Module, anatomy: LayerAnatomy) -> tuple[str, ...]:
    """The attributes of ``attention`` that the anatomy says it has (a KV-sharing layer has no k/v parts)."""
    shared = _shares_kv(attention, anatomy)
    parts = ("q_proj", "o_proj") + (() if shared else ("k_proj", "v_proj"))
    if anatomy.qk_norm:
        parts += ("q_norm",) + (() if shared else ("k_norm",))
    if anatomy.value_norm and not shared:
        parts += ("v_norm",)
    if anatomy.kv_sharing:
        parts += ("layer_type", "is_kv_shared_layer", "store_full_length_kv")
    return parts + _ATTENTION_ATTRIBUTES


def unsupported_reason(
    layer: nn.Module, anatomy: LayerAnatomy, output_norms: bool, extra_parts: tuple[str, ...] = ()
) -> str | None:
    """Why ``layer`` does not have ``anatomy`` or runs on an unsupported attention backend; None when it is fine.

    ``output_norms``: whether the calling fast layer norms each branch's output (sandwich) or not (pre-norm);
    ``extra_parts``: further attributes of the layer that the calling fast layer uses."""
    if (bool(anatomy.attention_output_norm), bool(anatomy.mlp_output_norm)) != (output_norms, output_norms):
        kind = "needs" if output_norms else "has no"
        return f"the {anatomy.module} layer {kind} branch-output norms (attention_output_norm, mlp_output_norm)"
    attention = getattr(layer, anatomy.attention, None)
    parts = attention_parts(attention, anatomy)
    missing = [name for name in (anatomy.attention, anatomy.mlp, *anatomy.norms, *extra_parts)
               if not hasattr(layer, name)]
    missing += [f"{anatomy.attention}.{name}" for name in parts if not hasattr(attention, name)]
    if not missing and not _shares_kv(attention, anatomy) and attention.v_proj is None and not anatomy.value_from_key:
        missing.append(f"{anatomy.attention}.v_proj (it is None)")
    supported = (f"the fast {anatomy.module} layer supports {anatomy.attention}({', '.join(parts)}), "
                 f"{', '.join((*anatomy.norms, *extra_parts))}, {anatomy.mlp}; mode='reference' works with any layer")
    name = type(layer).__name__
    if missing:
        return f"{name} does not have the expected layer anatomy (missing {', '.join(missing)}); {supported}"
    if not anatomy.qk_norm and (hasattr(attention, "q_norm") or hasattr(attention, "k_norm")):
        return f"{name} norms its queries/keys, which its registered anatomy does not describe; {supported}"
    if not anatomy.value_norm and hasattr(attention, "v_norm"):
        return f"{name} norms its values, which its registered anatomy does not describe; {supported}"
    heads = getattr(getattr(attention, "config", None), "num_attention_heads", None)
    per_head = attention.head_dim * (2 if anatomy.output_gate else 1)
    if heads is not None and attention.q_proj.out_features != heads * per_head:
        what = "a query and an output gate" if anatomy.output_gate else "a query"
        return (f"{name}'s q_proj emits {attention.q_proj.out_features} features, not {what} of {attention.head_dim} "
                f"per head for {heads} heads, as its registered anatomy says; {supported}")
    return _backend_reason(attention)


def _backend_reason(attention: nn.Module) -> str | None:
    implementation = attention_implementation(attention)
    if implementation in SUPPORTED_ATTENTION:
        return None
    return (
        f"attn_implementation={implementation!r} is not supported by the fast ShortV layer (supported: "
        f"{', '.join(SUPPORTED_ATTENTION)}); load the model with attn_implementation='sdpa' or use mode='reference'"
    )


# ---- rows -------------------------------------------------------------------------------------------------------
def gather_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x[b, positions[b, j]]`` for x of shape (batch or 1, seq, dim)."""
    x = x.expand(positions.shape[0], *x.shape[1:])
    return torch.gather(x, 1, positions.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def run_on_rows(module: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """A token-wise block (MLP or MoE) on text rows: (batch, width, dim) as they are, flat (n_text, dim) rows as one
    sequence (MoE blocks expect (batch, seq, dim))."""
    output = module(rows) if rows.dim() == 3 else module(rows.unsqueeze(0))
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"{type(module).__name__} returned {type(output).__name__}, expected a tensor")
    return output if rows.dim() == 3 else output.squeeze(0)


def residual_mlp(layer: nn.Module, anatomy: LayerAnatomy, layout: TokenLayout, hidden_states: torch.Tensor,
                 branch: torch.Tensor) -> torch.Tensor:
    """Pre-norm tail of a frozen layer: ``x + branch`` at the text rows, then ``+ mlp(norm(.))`` there; visual rows
    leave as they entered. Two ``index_add`` do the residual adds and the write-back (the rows round as ``x + y``)."""
    hidden_states = layout.add_text(hidden_states, branch)
    mlp = run_on_rows(getattr(layer, anatomy.mlp), getattr(layer, anatomy.mlp_norm)(layout.take_text(hidden_states)))
    return layout.add_text(hidden_states, mlp, inplace=True)


def residual_mlp_all_rows(layer: nn.Module, anatomy: LayerAnatomy, hidden_states: torch.Tensor) -> torch.Tensor:
    """Pre-norm tail of an attention-only frozen layer: ``x + mlp(norm(x))`` for every row, as unpatched."""
    return hidden_states + run_on_rows(getattr(layer, anatomy.mlp), getattr(layer, anatomy.mlp_norm)(hidden_states))


# ---- masks ------------------------------------------------------------------------------------------------------
def text_query_mask(
    attention_mask: torch.Tensor | None,
    layout: TokenLayout,
    past_length: int,
    kv_length: int,
    implementation: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The rows of the layer's 4-D attention mask that belong to the text queries, built once per forward and mask.

    Whatever the layer's mask encodes (causal, sliding window, bidirectional image blocks, padding) is kept for the
    text queries. When transformers passed no mask (sdpa's causal fast case), the causal mask is built explicitly:
    the text queries are a subset, so sdpa's ``is_causal`` alignment no longer applies.
    """
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4):
        raise TypeError(
            f"the fast ShortV layer expects a 4-D attention mask tensor, got {type(attention_mask).__name__}"
        )
    shared = layout.shared_positions
    positions = layout.text_positions if shared is None else shared

    def build() -> torch.Tensor:
        if attention_mask is None:
            # A static cache's length is a tensor: added without a branch on its value (no graph break, no sync).
            offset = isinstance(past_length, torch.Tensor) or past_length != 0
            query_index = (positions + past_length if offset else positions).unsqueeze(-1)
            allowed = torch.arange(kv_length, device=positions.device) <= query_index
            allowed = allowed.unsqueeze(1) if shared is None else allowed[None, None]  # (batch or 1, 1, width, kv)
            if implementation == "sdpa":
                return allowed
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        if shared is not None:
            return attention_mask.index_select(2, shared)
        batch, width = positions.shape
        mask = attention_mask.expand(batch, *attention_mask.shape[1:])
        index = positions[:, None, :, None].expand(batch, mask.shape[1], width, mask.shape[3])
        return torch.gather(mask, 2, index)

    return layout.memo("mask", attention_mask, build, past_length, kv_length, implementation, dtype)


def rope_tables(layout: TokenLayout, anatomy: LayerAnatomy, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[RopeTable, RopeTable]:
    """RoPE tables of every token (keys) and of the text rows (queries), built once per forward and cos/sin pair."""

    def build() -> tuple[RopeTable, RopeTable]:
        keys = rope_table(cos, sin, anatomy.rope)
        shared = layout.shared_positions
        return keys, take_rows(keys, layout.text_positions if shared is None else shared)

    return layout.memo("rope", cos, build, anatomy.rope)


# ---- attention --------------------------------------------------------------------------------------------------
def _llama4_query_scale(attention: nn.Module, position_ids: torch.Tensor | None, layout: TokenLayout) -> torch.Tensor:
    """Per-text-query scale ``1 + beta * log(1 + floor(pos / L))`` (batch, 1, width, 1) at the queries' positions."""
    if position_ids is None:
        raise RuntimeError("this layer scales queries by position and needs `position_ids` from the decoder")
    parameters = attention.config.rope_parameters
    beta, length = parameters.get("llama_4_scaling_beta"), parameters.get("original_max_position_embeddings")
    positions = torch.gather(position_ids.expand(layout.text_positions.shape[0], -1), 1, layout.text_positions)
    return (1 + beta * torch.log(1 + torch.floor(positions / length)))[:, None, :, None]


def attention_function(attention: nn.Module) -> Callable[..., Any]:
    reason = _backend_reason(attention)
    if reason is not None:
        raise RuntimeError(reason)
    # The family's own eager kernel lives next to its attention class in transformers.
    eager = getattr(sys.modules[type(attention).__module__], "eager_attention_forward")
    return ALL_ATTENTION_FUNCTIONS.get_interface(attention_implementation(attention), eager)


def _heads(attention: nn.Module, projected: torch.Tensor, norm: str | None) -> torch.Tensor:
    """(..., heads * head_dim) -> (..., heads, head_dim), normed per head when the anatomy says so."""
    heads = projected.view(*projected.shape[:-1], projected.shape[-1] // attention.head_dim, attention.head_dim)
    return getattr(attention, norm)(heads) if norm else heads


def _query_heads(
    attention: nn.Module, anatomy: LayerAnatomy, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Queries (rows, heads, head_dim) of ``rows`` and, with an output gate, the gate (rows, heads * head_dim)."""
    projected = attention.q_proj(rows)
    norm = "q_norm" if anatomy.qk_norm else None
    if not anatomy.output_gate:
        return _heads(attention, projected, norm), None
    # Each head's query and gate sit side by side in q_proj's output.
    query, gate = projected.view(*projected.shape[:-1], -1, 2 * attention.head_dim).chunk(2, dim=-1)
    return (getattr(attention, norm)(query) if norm else query), gate.reshape(*gate.shape[:-2], -1)


def _keys_values(
    attention: nn.Module,
    anatomy: LayerAnatomy,
    normed: torch.Tensor,
    rope: RopeTable,
    cache: Any,
    shared: Any,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Keys and values (batch, kv_heads, kv_length, head_dim) for every token, and how many positions precede this
    chunk. The KV cache, and a shared-KV store this layer writes, get every token, exactly as unpatched."""
    if _shares_kv(attention, anatomy):  # another layer's keys and values, over every position so far
        keys, values = shared[attention.layer_type]
        return keys, values, keys.shape[2] - normed.shape[1]
    projected = _heads(attention, attention.k_proj(normed), None)
    if attention.v_proj is None and anatomy.value_from_key:
        values = projected
    else:
        values = _heads(attention, attention.v_proj(normed), None)
    keys = attention.k_norm(projected) if anatomy.qk_norm else projected
    if anatomy.value_norm:
        values = attention.v_norm(values)
    keys = apply_rope_table(keys.transpose(1, 2), rope)
    values = values.transpose(1, 2)
    past_length = cache.get_seq_length(attention.layer_idx) if cache is not None else 0
    if isinstance(past_length, torch.Tensor):  # a static cache's counter: the update below advances it in place
        past_length = past_length.clone()
    if cache is not None:
        keys, values = cache.update(keys, values, attention.layer_idx, kwargs=kwargs)
    if anatomy.kv_sharing and attention.store_full_length_kv:
        shared[attention.layer_type] = keys, values
    return keys, values, past_length


#: Decoder-layer arguments the fast layer consumes itself; the rest go to the attention function, as unpatched.
_LAYER_ARGUMENTS = frozenset(("attention_mask", "position_ids", "position_embeddings", "cache", "past_key_values",
                              "use_cache", "shared_kv_states"))


def _attention_call(attention: nn.Module, layout: TokenLayout) -> tuple[str, Callable[..., Any]]:
    """(implementation, attention function) of ``attention``, looked up once per forward for every layer that shares
    its config (reading a transformers config attribute costs more host time than a small kernel launch)."""
    config = getattr(attention, "config", None)
    return layout.memo("attention", config, lambda: (attention_implementation(attention),
                                                     attention_function(attention)), type(attention))


def attention_branch(
    layer: nn.Module, anatomy: LayerAnatomy, layout: TokenLayout, hidden_states: torch.Tensor, kwargs: dict[str, Any]
) -> torch.Tensor:
    """The attention branch of a frozen layer for the text rows (as `TokenLayout.take_text` gives them): input norm,
    keys and values for every token, queries, attention and ``o_proj`` for the text rows only.

    ``kwargs`` are the decoder layer's call arguments (mask, positions, RoPE, KV cache ...): the KV cache is updated
    with every token's keys and values, exactly as unpatched."""
    position_embeddings = kwargs.get("position_embeddings")
    if position_embeddings is None:
        raise RuntimeError("the fast ShortV layer needs `position_embeddings` (cos, sin) from the decoder")
    cos, sin = position_embeddings
    if cos.dim() != 3:
        raise RuntimeError(f"expected per-token cos/sin of shape (batch, seq, dim), got {tuple(cos.shape)}")
    attention = getattr(layer, anatomy.attention)
    rest = {key: value for key, value in kwargs.items() if key not in _LAYER_ARGUMENTS}
    normed = getattr(layer, anatomy.input_norm)(hidden_states)
    key_rope, query_rope = rope_tables(layout, anatomy, cos, sin)

    # Keys and values for every token, from the (frozen) current states.
    keys, values, past_length = _keys_values(attention, anatomy, normed, key_rope, cache_from_kwargs(kwargs),
                                             kwargs.get("shared_kv_states"), rest)
    batch, width = layout.text_positions.shape
    if width == 0:  # no text token in this chunk (all visual): the cache update above is all there is to do
        output = layout.take_text(normed)  # no rows
        if has_forward_hooks(attention):
            call_attention_hooks(attention, layout, output, None, {"hidden_states": normed, **rest})
        return output

    # Queries for text tokens only: text rows through q_proj, then (per-sample layouts) into a (batch, width) grid.
    queries, gate = _query_heads(attention, anatomy, layout.take_text(normed))
    queries = apply_rope_table(layout.to_grid(queries).transpose(1, 2), query_rope)
    position_ids = kwargs.get("position_ids")
    if anatomy.query_scale == "llama4":
        scale = layout.memo("llama4", position_ids, lambda: _llama4_query_scale(attention, position_ids, layout))
        queries = queries * scale.to(queries.dtype)

    implementation, function = _attention_call(attention, layout)
    mask = text_query_mask(kwargs.get("attention_mask"), layout, past_length, keys.shape[2], implementation,
                           queries.dtype)
    output, weights = function(
        attention,
        queries,
        keys,
        values,
        mask,
        dropout=0.0 if not attention.training else attention.attention_dropout,
        scaling=attention.scaling,
        sliding_window=getattr(attention, "sliding_window", None),
        position_ids=position_ids,
        **rest,
    )
    output = layout.from_grid(output.reshape(batch, width, -1))
    if gate is not None:
        output = output * torch.sigmoid(gate)
    output = attention.o_proj(output)
    if has_forward_hooks(attention):  # output_attentions and user hooks on the attention module
        call_attention_hooks(attention, layout, output, weights, {"hidden_states": normed, **rest})
    return output
