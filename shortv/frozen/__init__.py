"""Frozen decoder layers: ``reference`` (run then restore, any architecture) and compute-skipping fast paths.

A fast path is a module of this package, one per residual structure (``prenorm``, ``sandwich``), with
``unsupported_reason(layer, anatomy) -> str | None`` and
``fast_frozen_forward(layer, anatomy, layout, hidden_states, **layer_kwargs) -> hidden_states``. The registry gives
each language model a `LayerAnatomy` (which module, and the names of the layer's parts); `fast_layer_module` binds
the two, so callers use ``fast.unsupported_reason(layer)`` and ``fast.fast_frozen_forward(layer, layout, hidden,
**layer_kwargs)``.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch
from torch import nn

from ..layout import TokenLayout
from .anatomy import LayerAnatomy

__all__ = ["FastLayer", "LayerAnatomy", "fast_layer_module"]


class FastLayer:
    """A fast frozen-layer module bound to one layer anatomy."""

    def __init__(self, anatomy: LayerAnatomy):
        self.anatomy = anatomy
        self.module = importlib.import_module(f"{__name__}.{anatomy.module}")

    def unsupported_reason(self, layer: nn.Module) -> str | None:
        """Why ``layer`` cannot take this fast path, or None when it can."""
        return self.module.unsupported_reason(layer, self.anatomy)

    def fast_frozen_forward(
        self, layer: nn.Module, layout: TokenLayout, hidden_states: torch.Tensor, **layer_kwargs: Any
    ) -> torch.Tensor:
        return self.module.fast_frozen_forward(layer, self.anatomy, layout, hidden_states, **layer_kwargs)

    def __repr__(self) -> str:
        return f"FastLayer({self.anatomy!r})"

    # Code plus a frozen anatomy: immutable, so a deep copy of a patched model shares it, and pickles rebuild it.
    def __deepcopy__(self, memo: dict) -> FastLayer:
        return self

    def __reduce__(self) -> tuple:
        return (fast_layer_module, (self.anatomy,))


@functools.lru_cache(maxsize=None)
def fast_layer_module(anatomy: LayerAnatomy | str) -> FastLayer:
    """The fast frozen layer for ``anatomy`` (a module name stands for that module with the default anatomy)."""
    return FastLayer(anatomy if isinstance(anatomy, LayerAnatomy) else LayerAnatomy(module=anatomy))
