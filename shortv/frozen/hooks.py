"""Forward hooks on a frozen layer's attention module, which the fast path computes without calling the module.

transformers records ``output_attentions`` with forward hooks on every attention module, and users hang their own
hooks there too. The fast frozen layer computes attention for text queries only and never calls the module, so it
calls those hooks itself with the module's output in its usual shapes: ``(batch, seq, hidden)`` with zero rows at
visual positions (a frozen layer adds nothing to visual tokens) and, where the attention backend returns weights,
``(batch, heads, seq, kv)`` with zero rows for visual queries (they issue no query). A linear-attention token mixer
(one output tensor, no attention weights) gets the same treatment. Hooks only observe: a value they return is
ignored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from ..layout import TokenLayout


def has_forward_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks) or bool(torch_module._global_forward_hooks)


def _scatter_rows(grid: torch.Tensor, layout: TokenLayout, row_dim: int) -> torch.Tensor:
    """``grid`` with a row per text slot along ``row_dim`` -> full ``seq`` rows, zeros at visual positions."""
    grid = grid.movedim(row_dim, 1)  # (batch, width, ...)
    full = layout.put_text(grid.new_zeros(*layout.shape, *grid.shape[2:]), layout.from_grid(grid))
    return full.movedim(1, row_dim)


def _full_rows(layout: TokenLayout, text_output: torch.Tensor) -> torch.Tensor:
    """Text rows (n_text, hidden) -> (batch, seq, hidden) with zero rows at visual positions."""
    return layout.put_text(text_output.new_zeros(*layout.shape, text_output.shape[-1]), text_output)


def _run_hooks(module: nn.Module, kwargs: dict[str, Any], output: Any) -> None:
    hooks = {**torch_module._global_forward_hooks, **module._forward_hooks}
    for hook_id, hook in hooks.items():
        if hook_id in module._forward_hooks_with_kwargs:
            hook(module, (), kwargs, output)
        else:
            hook(module, (), output)


def call_mixer_hooks(mixer: nn.Module, layout: TokenLayout, text_output: torch.Tensor, kwargs: dict[str, Any]) -> None:
    """Run the forward hooks of a token mixer whose output is one tensor (a linear-attention module) as if it had
    produced ``text_output`` (flat text rows) at the text positions and zeros elsewhere."""
    _run_hooks(mixer, kwargs, _full_rows(layout, text_output))


def call_attention_hooks(
    attention: nn.Module,
    layout: TokenLayout,
    text_output: torch.Tensor,
    weights: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> None:
    """Run ``attention``'s forward hooks as if it had produced ``text_output`` (flat text rows) and ``weights``."""
    output = (_full_rows(layout, text_output), None if weights is None else _scatter_rows(weights, layout, 2))
    _run_hooks(attention, kwargs, output)
