"""Count the aten operators a forward dispatches, per decoder layer: the host-side cost that decides a small eager
prefill on a GPU (nearly every operator that is not a view is a kernel launch), measured without one.

`count_ops` runs a call under a `torch.utils._python_dispatch.TorchDispatchMode` and attributes every operator to
the decoder layer running when it was dispatched (forward hooks mark the layers), or to ``None`` outside the
layers (embedding, entry hooks, mask and RoPE construction, final norm, LM head). Shared by
``benchmarks/bench_host_overhead.py`` and the operator-count tests, so both count the same thing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

#: Operators that read device memory on the host (``.item()``, ``bool(tensor)``, an output size that depends on
#: values): a sync on a GPU.
SYNC_OPERATORS = frozenset(("aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.nonzero"))


def _storage(value: Any) -> int | None:
    if isinstance(value, (tuple, list)):
        value = value[0] if value else None
    return value.untyped_storage().data_ptr() if isinstance(value, torch.Tensor) else None


class CountOps(TorchDispatchMode):
    """Counts the aten operators dispatched while active, per ``slot`` (set by the caller); views (no kernel, but
    host time) are counted as ``view:<name>``. An operator whose schema allows a view but that copied (``reshape``
    of an expanded tensor reaches the dispatcher whole under ``inference_mode``) counts as a kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.slot: Any = None
        self.counts: dict[Any, Counter[str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        view = func.is_view and _storage(output) == _storage(args[0] if args else None)
        counter = self.counts.setdefault(self.slot, Counter())
        counter[("view:" if view else "") + str(func.overloadpacket)] += 1
        return output


def kernels(counts: Counter[str]) -> int:
    """Operators that are not views (nearly all of them launch a kernel on a GPU)."""
    return sum(count for op, count in counts.items() if not op.startswith("view:"))


def syncs(counts: Counter[str]) -> int:
    """Device-to-host reads among ``counts``."""
    return sum(count for op, count in counts.items() if op in SYNC_OPERATORS)


def total(counts: dict[Any, Counter[str]]) -> Counter[str]:
    """All slots of a `count_ops` result together."""
    return sum(counts.values(), Counter())


def count_ops(call: Callable[[], Any], layers: nn.ModuleList | None = None) -> dict[Any, Counter[str]]:
    """Operators ``call()`` dispatches: ``{layer index: Counter, ..., None: Counter}``, ``None`` holding those
    dispatched outside the decoder ``layers`` (all of them when ``layers`` is None)."""
    counter = CountOps()
    handles = []

    def enter(index: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            counter.slot = index
        return hook

    def leave(*_: Any) -> None:
        counter.slot = None

    for index, layer in enumerate(layers or ()):
        handles.append(layer.register_forward_pre_hook(enter(index)))
        handles.append(layer.register_forward_hook(leave, always_call=True))
    try:
        with counter:
            call()
    finally:
        for handle in handles:
            handle.remove()
    return counter.counts
