"""Compute-skipping ShortV layer for pre-norm decoder layers (Llama, Mistral, Qwen2/3, the Qwen-VL text models).

Residual structure: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``. In a frozen layer the attention branch
runs with text queries only (`common.text_attention`: keys and values for every token) and the MLP (dense or MoE)
on the text rows only; visual hidden states leave the layer untouched. The rows fed to ``q_proj``, ``o_proj`` and
the MLP are exactly the text tokens of the batch, whatever their layout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layout import TokenLayout
from . import common
from .anatomy import LayerAnatomy


def unsupported_reason(layer: nn.Module, anatomy: LayerAnatomy) -> str | None:
    return common.unsupported_reason(layer, anatomy, output_norms=False)


def fast_frozen_forward(
    layer: nn.Module, anatomy: LayerAnatomy, layout: TokenLayout, hidden_states: torch.Tensor, **kwargs: Any
) -> torch.Tensor:
    attention = common.attention_branch(layer, anatomy, layout, hidden_states, kwargs)
    return common.residual_mlp(layer, anatomy, layout, hidden_states, attention)
