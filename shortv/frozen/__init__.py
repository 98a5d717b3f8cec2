"""Frozen decoder layers: ``reference`` (run then restore, any architecture) and compute-skipping fast paths.

A fast path is a module of this package, one per residual structure (``prenorm``, ``sandwich``,
``linear_attention``), with ``unsupported_reason(layer, anatomy) -> str | None`` and
``fast_frozen_forward(layer, anatomy, layout, hidden_states, **layer_kwargs) -> hidden_states``, and
``fast_attention_frozen_forward`` with the same arguments for operator-level layers whose visual rows skip only the
attention update (those that skip only the MLP run the layer's own forward with the MLP fed the text rows,
`FastLayer.fast_mlp_frozen_forward`). The registry gives each language model a `LayerAnatomy` (which
module, and the names of the layer's parts), or `LayerKinds` (one anatomy per layer type) when its layers differ;
`fast_layer_module` binds them, so callers use ``fast.unsupported_reason(layer)`` and
``fast.fast_frozen_forward(layer, layout, hidden, **layer_kwargs)`` whatever the layer's kind.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..layout import TokenLayout
from .anatomy import LayerAnatomy, LayerKinds, ParallelMoE, PerLayerInput
from .operators import mlp_on_text_rows, mlp_slot_modules

__all__ = ["FastLayer", "LayerAnatomy", "LayerKinds", "ParallelMoE", "PerLayerInput", "fast_layer_module"]


class FastLayer:
    """A fast frozen-layer module bound to one layer anatomy, or to one per layer type (`LayerKinds`)."""

    def __init__(self, anatomy: LayerAnatomy | LayerKinds):
        self.anatomy = anatomy
        if isinstance(anatomy, LayerKinds):
            self.module = None
            self.kinds = {kind: fast_layer_module(sub) for kind, sub in anatomy.anatomies}
        else:
            self.module = importlib.import_module(f"{__name__}.{anatomy.module}")
            self.kinds = {}

    def _for(self, layer: nn.Module) -> FastLayer | None:
        """The single-anatomy fast layer for ``layer`` (None: its type has no fast anatomy)."""
        if self.module is not None:
            return self
        return self.kinds.get(self.anatomy.type_of(layer))

    def unsupported_reason(self, layer: nn.Module) -> str | None:
        """Why ``layer`` cannot take this fast path, or None when it can."""
        fast = self._for(layer)
        if fast is None:
            kind = self.anatomy.type_of(layer)
            return (f"{type(layer).__name__} has layer type {kind!r} ({self.anatomy.type_attribute}); the fast layer "
                    f"supports {', '.join(self.kinds)}; mode='reference' works with any layer")
        return fast.module.unsupported_reason(layer, fast.anatomy)

    def _runnable(self, layer: nn.Module) -> FastLayer:
        fast = self._for(layer)
        if fast is None:
            raise RuntimeError(self.unsupported_reason(layer))
        return fast

    def fast_frozen_forward(
        self, layer: nn.Module, layout: TokenLayout, hidden_states: torch.Tensor, **layer_kwargs: Any
    ) -> torch.Tensor:
        fast = self._runnable(layer)
        return fast.module.fast_frozen_forward(layer, fast.anatomy, layout, hidden_states, **layer_kwargs)

    def fast_attention_frozen_forward(
        self, layer: nn.Module, layout: TokenLayout, hidden_states: torch.Tensor, **layer_kwargs: Any
    ) -> torch.Tensor:
        """Operator-level: visual rows skip only the attention update (`shortv.frozen.operators`)."""
        fast = self._runnable(layer)
        return fast.module.fast_attention_frozen_forward(layer, fast.anatomy, layout, hidden_states, **layer_kwargs)

    def fast_mlp_frozen_forward(
        self, layer: nn.Module, layout: TokenLayout, forward: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        """Operator-level: visual rows skip only the MLP update; ``forward(*args, **kwargs)`` (the layer's own) runs
        with its MLP slot fed the text rows (`shortv.frozen.operators.mlp_on_text_rows`)."""
        modules, routers = mlp_slot_modules(layer, self._runnable(layer).anatomy)
        with mlp_on_text_rows(modules, layout, routers):
            return forward(*args, **kwargs)

    def __repr__(self) -> str:
        return f"FastLayer({self.anatomy!r})"

    # Code plus a frozen anatomy: immutable, so a deep copy of a patched model shares it, and pickles rebuild it.
    def __deepcopy__(self, memo: dict) -> FastLayer:
        return self

    def __reduce__(self) -> tuple:
        return (fast_layer_module, (self.anatomy,))


@functools.lru_cache(maxsize=None)
def fast_layer_module(anatomy: LayerAnatomy | LayerKinds | str) -> FastLayer:
    """The fast frozen layer for ``anatomy`` (a module name stands for that module with the default anatomy)."""
    return FastLayer(anatomy if isinstance(anatomy, (LayerAnatomy, LayerKinds)) else LayerAnatomy(module=anatomy))
