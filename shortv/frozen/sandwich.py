"""Compute-skipping ShortV layer for sandwich-norm decoder layers (Gemma 3, GLM-4.1V).

Residual structure: ``x + out_norm(attention(norm(x)))``, then ``x + out_norm(mlp(norm(x)))``: each branch's output
is normed before the residual add. The attention branch runs with text queries only (`common.text_attention`: keys
and values for every token, whatever mask the decoder gives this layer, sliding or global) and the MLP on the text
rows only; visual hidden states leave the layer untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layout import TokenLayout
from . import common
from .anatomy import LayerAnatomy


def unsupported_reason(layer: nn.Module, anatomy: LayerAnatomy) -> str | None:
    return common.unsupported_reason(layer, anatomy, output_norms=True)


def fast_frozen_forward(
    layer: nn.Module, anatomy: LayerAnatomy, layout: TokenLayout, hidden_states: torch.Tensor, **kwargs: Any
) -> torch.Tensor:
    attention = common.attention_branch(layer, anatomy, layout, hidden_states, kwargs)
    text = layout.take_text(hidden_states) + getattr(layer, anatomy.attention_output_norm)(attention)
    mlp = common.run_on_rows(getattr(layer, anatomy.mlp), getattr(layer, anatomy.mlp_norm)(text))
    text = text + getattr(layer, anatomy.mlp_output_norm)(mlp)
    return layout.put_text(hidden_states, text)
