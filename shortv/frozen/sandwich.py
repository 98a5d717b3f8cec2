"""Compute-skipping ShortV layer for sandwich-norm decoder layers (Gemma 3, GLM-4.1V).

Residual structure: ``x + out_norm(attention(norm(x)))``, then ``x + out_norm(mlp(norm(x)))``: each branch's output
is normed before the residual add. The attention half runs with text queries only (`common.text_attention`: keys
and values for every token, whatever mask the decoder gives this layer, sliding or global) and the MLP on the text
rows only; visual hidden states leave the layer untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layout import TokenLayout
from .anatomy import LayerAnatomy
from .common import run_on_rows, text_attention, with_text_rows
from .common import unsupported_reason as _common_reason

__all__ = ["unsupported_reason", "fast_frozen_forward"]


def unsupported_reason(layer: nn.Module, anatomy: LayerAnatomy) -> str | None:
    if not (anatomy.attention_output_norm and anatomy.mlp_output_norm):
        return "the sandwich layer needs `attention_output_norm` and `mlp_output_norm` in its anatomy"
    return _common_reason(layer, anatomy)


def fast_frozen_forward(
    layer: nn.Module,
    anatomy: LayerAnatomy,
    layout: TokenLayout,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    normed = getattr(layer, anatomy.input_norm)(hidden_states)
    attention = text_attention(getattr(layer, anatomy.attention), anatomy, layout, normed, attention_mask,
                               position_embeddings, position_ids, kwargs)
    text_states = hidden_states[layout.text] + getattr(layer, anatomy.attention_output_norm)(attention)
    mlp = run_on_rows(getattr(layer, anatomy.mlp), getattr(layer, anatomy.mlp_norm)(text_states))
    text_states = text_states + getattr(layer, anatomy.mlp_output_norm)(mlp)
    return with_text_rows(hidden_states, layout, text_states)
