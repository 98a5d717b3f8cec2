"""Frozen decoder layers: ``reference`` (run then restore, any architecture) and compute-skipping fast paths.

A fast path is a module of this package with ``unsupported_reason(layer) -> str | None`` and
``fast_frozen_forward(layer, layout, hidden_states, **layer_kwargs) -> hidden_states``; the registry names it per
family (``Architecture.fast_layer``).
"""

from __future__ import annotations

import importlib
from types import ModuleType


_LOADED: dict[str, ModuleType] = {}


def fast_layer_module(name: str) -> ModuleType:
    """The fast frozen-layer module ``shortv.frozen.<name>`` (imported once; later calls are a dict lookup, which
    torch.compile traces through)."""
    module = _LOADED.get(name)
    if module is None:
        module = _LOADED[name] = importlib.import_module(f"{__name__}.{name}")
    return module
