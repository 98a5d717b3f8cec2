"""Reference operator-level freezing: visual rows skip a decoder layer's attention update, its MLP update, or both.

A layer's update to a token is the sum of its branches: ``x + attention_branch + mlp_branch`` (pre-norm), with a norm
on each branch's output in sandwich layers, and a linear-attention token mixer in the attention slot of hybrid
models. Skipping one operator on the visual rows means that branch adds nothing there: the hidden state of a visual
row leaves the attention step as it entered (then the MLP runs on it), or keeps its post-attention state (no MLP).
Here that is done by a forward hook on the operator's module(s), named by the layer's `LayerAnatomy`, which zeroes the
visual rows of their output while the layer runs as usual. It is exact because every post-branch norm of the
registry's anatomies is an RMSNorm, which maps a zero row to a zero row; keys and values (and a linear-attention
state) are still computed from every token, and text rows see exactly what they see unpatched (the MLP, dense or
MoE, is per token). Skipping both operators is the ShortV layer.

Branches that belong to neither operator (a per-layer-input branch after the MLP, a scale on the whole layer output)
still apply to every row: skipping an operator removes that operator's branch and nothing else, so the
visual rows' change is exactly the operator's own update (x + mlp(...) + per_layer_branch(...), times the scale, for
a visual row that skips the attention). A ShortV layer (both operators) stays what it is: the visual rows leave the
whole layer as they entered, with neither branch nor scale.

The fast path (``mode="fast"``): a layer whose visual rows skip only the attention update runs the fast layer
module's ``fast_attention_frozen_forward`` (queries and ``o_proj`` for text rows, keys and values for all, the MLP
and the other branches on every row); one whose visual rows skip only the MLP runs its own forward with the MLP slot
fed its text rows only (`mlp_on_text_rows`; a parallel MoE's router and experts too), the visual rows of the slot's
output being zero as in the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..layout import TokenLayout
from .anatomy import LayerAnatomy


def operator_modules(layer: nn.Module, anatomy: LayerAnatomy | None, operator: str) -> list[nn.Module]:
    """The submodules of ``layer`` whose outputs make up ``operator``'s branch ("attention" or "mlp")."""
    if anatomy is None:
        raise ValueError(
            f"operator-level freezing needs the layer anatomy of {type(layer).__name__} (shortv.registry."
            "LANGUAGE_MODELS), and its language model has none; freeze whole layers (`layers`) instead"
        )
    if operator == "attention":
        names = [anatomy.attention]
    elif operator == "mlp":
        names = [anatomy.mlp]
        moe = anatomy.parallel_moe
        if moe is not None and getattr(layer, moe.enabled, False):
            names.append(moe.experts)
    else:
        raise ValueError(f"unknown operator {operator!r}; choose 'attention' or 'mlp'")
    modules = [getattr(layer, name, None) for name in names]
    missing = [name for name, module in zip(names, modules) if not isinstance(module, nn.Module)]
    if missing:
        raise ValueError(f"{type(layer).__name__} has no submodule {missing[0]!r} (its anatomy's {operator})")
    return modules  # type: ignore[return-value]


class ZeroRows:
    """Forward hook: the module's output (or its first element) with the rows where ``mask`` is True set to zero.

    ``mask`` is (batch, seq); the output's leading dims hold batch * seq rows, as (batch, seq, ...) or flattened."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def zero(self, output: torch.Tensor) -> torch.Tensor:
        rows = self.mask.to(output.device).reshape(-1)
        flat = output.reshape(rows.numel(), -1)
        return torch.where(rows[:, None], flat.new_zeros(()), flat).view(output.shape)

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (self.zero(output[0]), *output[1:])
        return self.zero(output)


@contextmanager
def updates_removed(modules: Collection[nn.Module], mask: torch.Tensor) -> Iterator[None]:
    """While inside, the ``modules`` add nothing to the rows where ``mask`` (batch, seq) is True.

    The hooks run first, so other hooks on those modules (transformers' output recording) see the zeroed rows, as
    they see a fast frozen layer's output."""
    hook = ZeroRows(mask)
    handles = [module.register_forward_hook(hook, prepend=True) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def reference_operator_forward(
    original_forward: Callable[..., Any],
    modules: Collection[nn.Module],
    frozen: torch.Tensor,
    hidden_states: torch.Tensor,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """The layer's forward with the ``modules``' updates removed at the ``frozen`` (batch x seq) positions."""
    with updates_removed(modules, frozen):
        return original_forward(hidden_states, *args, **kwargs)


def frozen_operator_modules(
    layer: nn.Module, anatomy: LayerAnatomy | None, operators: Collection[str]
) -> list[nn.Module]:
    """The modules to silence on visual rows for ``operators`` of ``layer``."""
    return [module for operator in sorted(operators) for module in operator_modules(layer, anatomy, operator)]


def mlp_slot_modules(layer: nn.Module, anatomy: LayerAnatomy) -> tuple[list[nn.Module], list[nn.Module]]:
    """The modules of ``layer``'s MLP slot that an MLP-only frozen layer runs on the text rows: (the MLP and a
    parallel MoE's experts, whose outputs go back with zero visual rows; the MoE's router, fed the text rows only)."""
    moe = anatomy.parallel_moe
    routers = [getattr(layer, moe.router)] if moe is not None and getattr(layer, moe.enabled, False) else []
    return operator_modules(layer, anatomy, "mlp"), routers


class _TextRowsOnly:
    """Hooks of an MLP (or MoE block) that feed it the text rows of its input and put its output back at the text
    positions, with zero rows at the visual ones (the MLP adds nothing to them). The input is (batch, seq, hidden)
    or flattened to (batch * seq, hidden) (a MoE's router and experts); other tensor arguments with a row per token
    (the experts' routing, computed from text rows) pass as they are."""

    def __init__(self, layout: TokenLayout):
        self.layout = layout
        self.shape: torch.Size | None = None

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            hidden, args = args[0], args[1:]
        else:
            hidden = kwargs.pop("hidden_states")
        self.shape = hidden.shape
        flat = hidden.dim() == 2
        rows = self.layout.take_text(hidden.view(*self.layout.shape, -1) if flat else hidden)
        # (batch, width, hidden) shared; (n_text, hidden): one sequence (or flat rows)
        if flat:
            rows = rows.reshape(-1, rows.shape[-1])
        elif rows.dim() == 2:
            rows = rows.unsqueeze(0)
        return (rows, *args), kwargs

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        rows = output[0] if isinstance(output, tuple) else output
        batch, seq = self.layout.shape
        if self.layout.shared_positions is not None:
            rows = rows.reshape(batch, -1, rows.shape[-1])
        elif rows.dim() == 3:
            rows = rows.squeeze(0)
        full = self.layout.put_text(rows.new_zeros(batch, seq, self.shape[-1]), rows).view(self.shape)
        return (full, *output[1:]) if isinstance(output, tuple) else full


@contextmanager
def mlp_on_text_rows(modules: Collection[nn.Module], layout: TokenLayout,
                     routers: Collection[nn.Module] = ()) -> Iterator[None]:
    """While inside, the ``modules`` (a layer's MLP) compute their text rows only and add nothing to visual rows;
    the ``routers`` (a MoE's, feeding its experts) see the text rows only."""
    handles = []
    for module in (*modules, *routers):
        hooks = _TextRowsOnly(layout)
        handles.append(module.register_forward_pre_hook(hooks.before, with_kwargs=True, prepend=True))
        if module not in routers:
            handles.append(module.register_forward_hook(hooks.after, with_kwargs=True, prepend=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
