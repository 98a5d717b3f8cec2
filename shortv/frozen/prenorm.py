"""Compute-skipping ShortV layer for pre-norm decoder layers (Llama, Mistral, Qwen2/3, the Qwen-VL text models).

Residual structure: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``. In a frozen layer the attention half runs
with text queries only (`common.text_attention`: keys and values for every token) and the MLP (dense or MoE) runs
on the text rows only; visual hidden states leave the layer untouched. The rows fed to ``q_proj``, ``o_proj`` and
the MLP are exactly the text tokens of the batch, whatever their layout.
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
    if anatomy.attention_output_norm or anatomy.mlp_output_norm:
        return "the pre-norm layer has no branch-output norms; this anatomy needs module='sandwich'"
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
    text_states = hidden_states[layout.text] + attention
    text_states = text_states + run_on_rows(getattr(layer, anatomy.mlp), getattr(layer, anatomy.mlp_norm)(text_states))
    return with_text_rows(hidden_states, layout, text_states)
