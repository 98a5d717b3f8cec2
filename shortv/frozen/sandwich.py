"""Compute-skipping ShortV layer for sandwich-norm decoder layers (Gemma 3, GLM-4.1V, Gemma 4).

Residual structure: ``x + out_norm(attention(norm(x)))``, then ``x + out_norm(mlp(norm(x)))``: each branch's output
is normed before the residual add. The attention branch runs with text queries only (`common.text_attention`: keys
and values for every token, whatever mask the decoder gives this layer, sliding or global) and the MLP on the text
rows only; visual hidden states leave the layer untouched.

Optional parts, where the anatomy names them and the layer has them switched on: a sparse MoE branch beside the
MLP (`anatomy.ParallelMoE`: router and experts see the text rows only), a per-layer-input branch after the MLP
(`anatomy.PerLayerInput`: fed the text rows of the layer's per-layer input) and a buffer scaling the layer's whole
output (``output_scale``). A frozen layer computes all three for text tokens exactly as unpatched; visual tokens
leave the layer as they entered, so neither the per-layer input nor the output scale touches them.

An attention-only frozen layer (operator-level freezing, `shortv.frozen.operators`) skips the visual rows' attention
branch the same way, then runs the MLP slot, the per-layer-input branch and the output scale on every row.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layout import TokenLayout
from . import common
from .anatomy import LayerAnatomy, ParallelMoE, PerLayerInput


def _enabled(layer: nn.Module, part: ParallelMoE | PerLayerInput | None) -> bool:
    return part is not None and bool(getattr(layer, part.enabled, False))


def _optional_parts(layer: nn.Module, anatomy: LayerAnatomy) -> tuple[str, ...]:
    parts: tuple[str, ...] = (anatomy.output_scale,) if anatomy.output_scale else ()
    if _enabled(layer, anatomy.parallel_moe):
        moe = anatomy.parallel_moe
        parts += (moe.router, moe.experts, moe.input_norm, moe.output_norm, moe.mlp_norm)
    if _enabled(layer, anatomy.per_layer_input):
        branch = anatomy.per_layer_input
        parts += (branch.gate, branch.activation, branch.projection, branch.norm)
    return parts


def unsupported_reason(layer: nn.Module, anatomy: LayerAnatomy) -> str | None:
    return common.unsupported_reason(layer, anatomy, output_norms=True, extra_parts=_optional_parts(layer, anatomy))


def _mlp_slot(layer: nn.Module, anatomy: LayerAnatomy, text: torch.Tensor) -> torch.Tensor:
    """The MLP slot's output for the text rows ``text`` (the residual stream entering it), before its output norm."""
    mlp = common.run_on_rows(getattr(layer, anatomy.mlp), getattr(layer, anatomy.mlp_norm)(text))
    moe = anatomy.parallel_moe
    if not _enabled(layer, moe):
        return mlp
    flat = text.reshape(-1, text.shape[-1])  # the router and experts take (tokens, hidden)
    _, weights, experts = getattr(layer, moe.router)(flat)  # routed per token, from the raw residual stream
    routed = getattr(layer, moe.experts)(getattr(layer, moe.input_norm)(flat), experts, weights).reshape(text.shape)
    return getattr(layer, moe.mlp_norm)(mlp) + getattr(layer, moe.output_norm)(routed)


def _per_layer_input_branch(
    layer: nn.Module, branch: PerLayerInput, text: torch.Tensor, per_layer_input: torch.Tensor
) -> torch.Tensor:
    gated = getattr(layer, branch.activation)(getattr(layer, branch.gate)(text)) * per_layer_input
    return getattr(layer, branch.norm)(getattr(layer, branch.projection)(gated))


def fast_frozen_forward(
    layer: nn.Module, anatomy: LayerAnatomy, layout: TokenLayout, hidden_states: torch.Tensor, **kwargs: Any
) -> torch.Tensor:
    branch = anatomy.per_layer_input
    per_layer_input = kwargs.pop(branch.argument, None) if branch is not None else None
    attention = common.attention_branch(layer, anatomy, layout, hidden_states, kwargs)
    # The residual adds and the write-back of the text rows are `index_add`s (they round as ``x + y``).
    hidden_states = layout.add_text(hidden_states, getattr(layer, anatomy.attention_output_norm)(attention))
    text = layout.take_text(hidden_states)
    update = getattr(layer, anatomy.mlp_output_norm)(_mlp_slot(layer, anatomy, text))
    if not _enabled(layer, branch) and not anatomy.output_scale:
        return layout.add_text(hidden_states, update, inplace=True)
    text = text + update
    if _enabled(layer, branch):
        rows = layout.take_text(per_layer_input.expand(*hidden_states.shape[:2], -1))
        text = text + _per_layer_input_branch(layer, branch, text, rows)
    if anatomy.output_scale:
        text = text * getattr(layer, anatomy.output_scale)
    return layout.put_text(hidden_states, text)


def fast_attention_frozen_forward(
    layer: nn.Module, anatomy: LayerAnatomy, layout: TokenLayout, hidden_states: torch.Tensor, **kwargs: Any
) -> torch.Tensor:
    branch = anatomy.per_layer_input
    per_layer_input = kwargs.pop(branch.argument, None) if branch is not None else None
    attention = common.attention_branch(layer, anatomy, layout, hidden_states, kwargs)
    hidden_states = layout.add_text(hidden_states, getattr(layer, anatomy.attention_output_norm)(attention))
    hidden_states = hidden_states + getattr(layer, anatomy.mlp_output_norm)(_mlp_slot(layer, anatomy, hidden_states))
    if _enabled(layer, branch):  # neither operator's: every row, as unpatched
        hidden_states = hidden_states + _per_layer_input_branch(layer, branch, hidden_states, per_layer_input)
    if anatomy.output_scale:
        hidden_states = hidden_states * getattr(layer, anatomy.output_scale)
    return hidden_states
