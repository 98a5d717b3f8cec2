"""Apply ShortV to a loaded model *instance* (never to transformers classes), remove it, switch it off for a while.

How it works: forward pre-hooks on the modules where inputs enter (``shortv.entry``) decide, once per forward,
which positions are visual and store that in the model's `ShortVState`; each chosen decoder layer's ``forward`` is
replaced, on that layer instance only, by a `FrozenForward` that reads the state. Removing restores the exact
original attributes, so outputs become bit-identical again.

Everything attached is plain data or a module-level callable class holding references (no closures), so a patched
model deep-copies into an independent patched model, pickles (``torch.save(model)``), moves with ``.to()`` and
compiles with ``torch.compile``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import _compat
from .config import ShortVConfig
from .entry import ShortVState, entry_modules, install_entry_hooks, remove_entry_hooks
from .frozen import FastLayer
from .frozen.operators import frozen_operator_modules, reference_operator_forward
from .frozen.reference import reference_frozen_forward
from .registry import (
    architecture_for,
    fast_layer_for,
    find_decoder_layers,
    layer_anatomy,
    model_type_of,
    supported_fast_model_types,
    visual_token_ids,
)

STATE_ATTRIBUTE = "_shortv_state"


def _coerce_config(config_or_layers: ShortVConfig | Sequence[int]) -> ShortVConfig:
    if isinstance(config_or_layers, ShortVConfig):
        return config_or_layers
    if isinstance(config_or_layers, (str, bytes, dict)) or not hasattr(config_or_layers, "__iter__"):
        raise TypeError(
            f"apply_shortv expects a ShortVConfig or a list of layer indices, got {type(config_or_layers).__name__}"
        )
    return ShortVConfig(layers=list(config_or_layers))


def _check_applicable(model: nn.Module, config: ShortVConfig, layers: nn.ModuleList) -> None:
    """Every reason this config cannot be applied to this model, raised before anything is changed."""
    out_of_range = [index for index in config.frozen_operators if index >= len(layers)]
    if out_of_range:
        raise ValueError(
            f"ShortV layer index {out_of_range[0]} is out of range: {type(model).__name__} has {len(layers)} decoder "
            f"layers, valid indices are 0..{len(layers) - 1}"
        )
    for index, operators in sorted(config.frozen_operators.items()):
        if len(operators) == 1:  # refused here, before anything is changed, for a layer without a known anatomy
            frozen_operator_modules(layers[index], layer_anatomy(model, layers[index]), operators)
    if config.mode != "fast" or not config.frozen_operators:
        return
    arch = architecture_for(model)
    model_type = model_type_of(model)
    if not arch.fast_text_model_types:
        raise ValueError(
            f"mode='fast' does not support model_type={model_type!r}; supported: "
            f"{', '.join(supported_fast_model_types())}. mode='reference' works with any decoder."
        )
    text_type = getattr(model.config.get_text_config(), "model_type", None)
    if text_type not in arch.fast_text_model_types:
        raise ValueError(
            f"mode='fast' for {model_type!r} was verified with language models "
            f"{', '.join(arch.fast_text_model_types)}, not {text_type!r}; use mode='reference'"
        )
    fast_module = fast_layer_for(model)
    for index, operators in config.frozen_operators.items():
        if operators == {"mlp"}:  # the layer's own forward, its MLP fed the text rows
            continue
        reason = fast_module.unsupported_reason(layers[index])
        if reason is not None:
            raise ValueError(f"cannot apply the fast ShortV layer to decoder layer {index}: {reason}")


def _forward_attribute(module: nn.Module) -> str:
    # accelerate's device_map hooks replace `forward` and call `_old_forward`; patching the latter keeps their
    # input/output device moves around our frozen forward.
    return "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"


class _InstanceOverride:
    """A callable set as an instance attribute in place of ``attribute`` (``previous``: the value it hides, or None
    for the class's method). Holds only references, so deep copies and pickles follow the model."""

    attribute = "forward"

    def __init__(self, module: nn.Module, previous: Any):
        self.module, self.previous = module, previous

    def original(self) -> Any:
        if self.previous is not None:
            return self.previous
        # A partial rather than ``function.__get__``: torch.compile (torch 2.11) cannot trace ``__get__`` and breaks
        # the graph there, in every ShortV layer, then recompiles the shared resume frame per layer until it gives up.
        return functools.partial(getattr(type(self.module), self.attribute), self.module)

    @property
    def __signature__(self) -> inspect.Signature:  # what inspect.signature(module.forward) reports
        return inspect.signature(self.original())


class FrozenForward(_InstanceOverride):
    """The ``forward`` of a ShortV layer: the original while nothing is frozen, else the fast or reference freeze."""

    def __init__(self, state: ShortVState, layer: nn.Module, previous: Any, fast: FastLayer | None, attribute: str,
                 operator: str | None = None, silenced: tuple[nn.Module, ...] = ()):
        super().__init__(layer, previous)
        self.state, self.fast, self.attribute = state, fast, attribute
        #: Operator-level layer: the one update ("attention" or "mlp") visual rows skip, and the submodules that make
        #: it (`shortv.frozen.operators`); None and () for a ShortV layer.
        self.operator, self.silenced = operator, silenced

    def _bind(self, original: Any, hidden_states: torch.Tensor, args: tuple, kwargs: dict) -> dict[str, Any]:
        """(hidden_states, *args, **kwargs) -> keyword arguments, by the original forward's signature."""
        if not args:
            return dict(kwargs)
        signature = inspect.signature(original)
        arguments = dict(signature.bind_partial(hidden_states, *args, **kwargs).arguments)
        arguments.pop(next(iter(signature.parameters)))
        for name, parameter in signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
                arguments.update(arguments.pop(name))
        return arguments

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        state, original = self.state, self.original()
        if not state.enabled:
            return original(hidden_states, *args, **kwargs)
        if not state.decided:
            raise RuntimeError(
                "ShortV cannot tell which positions of this forward are visual: a frozen decoder layer ran with only "
                "`inputs_embeds` and no `visual_mask`, or outside a forward of the model or one of its entry modules "
                f"({', '.join(type(module).__name__ for module in state.entries)}). Pass `visual_mask=` (bool, batch x "
                "seq), use "
                "`using_visual_mask(model, mask)`, or `disable_shortv(model)` to run unfrozen."
            )
        layout = state.layout
        if layout is None:
            return original(hidden_states, *args, **kwargs)
        batch, seq = hidden_states.shape[:2]
        if (batch, seq) != layout.shape:
            if batch != layout.shape[0] or seq > layout.shape[1]:
                raise ValueError(
                    f"ShortV visual mask has shape {layout.shape} but decoder layer sees a sequence of shape "
                    f"{(batch, seq)}; pass a `visual_mask` (batch x seq) that matches the decoder input"
                )
            layout = layout.tail(seq)  # the decoder kept only the trailing positions for its last layers
            if layout is None:
                return original(hidden_states, *args, **kwargs)
        layout = layout.to(hidden_states.device)
        if self.operator is not None:
            return self._operator_forward(original, layout, hidden_states, args, kwargs)
        if self.fast is None:
            frozen = layout.visual if state.config.frozen_tokens == "visual" else layout.text
            return reference_frozen_forward(original, frozen, hidden_states, *args, **kwargs)
        kwargs = self._bind(original, hidden_states, args, kwargs)
        return self.fast.fast_frozen_forward(self.module, layout, hidden_states, **kwargs)

    def _operator_forward(self, original: Any, layout: Any, hidden_states: torch.Tensor, args: tuple,
                          kwargs: dict) -> Any:
        if self.fast is None:
            return reference_operator_forward(original, self.silenced, layout.visual, hidden_states, *args, **kwargs)
        if self.operator == "mlp":
            return self.fast.fast_mlp_frozen_forward(self.module, layout, original, hidden_states, *args, **kwargs)
        kwargs = self._bind(original, hidden_states, args, kwargs)
        return self.fast.fast_attention_frozen_forward(self.module, layout, hidden_states, **kwargs)


class ShortVGenerate(_InstanceOverride):
    """``generate(..., visual_mask=m)``: generate() rejects unknown kwargs, so the mask goes through the state."""

    attribute = "generate"

    def __init__(self, state: ShortVState, model: nn.Module, previous: Any):
        super().__init__(model, previous)
        self.state = state

    def __call__(self, *args: Any, visual_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if visual_mask is None:
            return self.original()(*args, **kwargs)
        previous = self.state.context_visual_mask, self.state.context_checked
        self.state.context_visual_mask, self.state.context_checked = visual_mask, False
        try:
            return self.original()(*args, **kwargs)
        finally:
            self.state.context_visual_mask, self.state.context_checked = previous


def get_shortv_state(model: nn.Module) -> ShortVState | None:
    return getattr(_unwrap(model), STATE_ATTRIBUTE, None)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module itself, not a ``torch.compile`` wrapper (patching the wrapper would miss the compiled code)."""
    return getattr(model, "_orig_mod", model) if type(model).__name__ == "OptimizedModule" else model


def _decoder_layers_path(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise ValueError(f"the decoder layers of {type(model).__name__} are not a submodule of it")


def _override(state: ShortVState, module: nn.Module, override: _InstanceOverride) -> None:
    object.__setattr__(module, override.attribute, override)
    state.patched.append((module, override.attribute, override.previous))


def apply_shortv(model: nn.Module, config_or_layers: ShortVConfig | Sequence[int]) -> nn.Module:
    """Freeze visual tokens in the configured decoder layers of ``model``, in place; returns ``model``.

    Applying again replaces the previous configuration. Every check runs before the model is touched, so an error
    leaves the model exactly as it was.
    """
    _compat.check_transformers_version()
    wrapper, model = model, _unwrap(model)
    config = _coerce_config(config_or_layers)
    layers = find_decoder_layers(model)
    _check_applicable(model, config, layers)
    if getattr(model, "_shortv_pruning_state", None) is not None:  # shortv.pruning's state attribute
        raise ValueError("ShortV on a model with FastV/VTW applied is not supported yet; remove_token_pruning(model) "
                         "first")
    entries = entry_modules(model, _decoder_layers_path(model, layers))

    if get_shortv_state(model) is not None:
        remove_shortv(model)
    fast = fast_layer_for(model) if config.mode == "fast" else None
    state = ShortVState(config=config, num_layers=len(layers), token_ids=visual_token_ids(model))
    for index, operators in sorted(config.frozen_operators.items()):
        layer = layers[index]
        attribute = _forward_attribute(layer)
        operator = None if len(operators) > 1 else next(iter(operators))
        silenced = () if operator is None else tuple(frozen_operator_modules(layer, layer_anatomy(model, layer),
                                                                              operators))
        _override(state, layer, FrozenForward(state, layer, layer.__dict__.get(attribute), fast, attribute, operator,
                                              silenced))
    if callable(getattr(model, "generate", None)):
        _override(state, model, ShortVGenerate(state, model, model.__dict__.get("generate")))
    install_entry_hooks(state, entries)
    object.__setattr__(model, STATE_ATTRIBUTE, state)
    return wrapper


def remove_shortv(model: nn.Module) -> nn.Module:
    """Undo `apply_shortv` exactly: original forwards and no hooks. A model without ShortV is returned unchanged."""
    state = get_shortv_state(model)
    if state is None:
        return model
    for module, attribute, previous in state.patched:
        if previous is None:
            object.__delattr__(module, attribute)
        else:
            object.__setattr__(module, attribute, previous)
    remove_entry_hooks(state)
    object.__delattr__(_unwrap(model), STATE_ATTRIBUTE)
    return model


def _require_state(model: nn.Module) -> ShortVState:
    state = get_shortv_state(model)
    if state is None:
        raise ValueError("this model has no ShortV applied; call apply_shortv(model, config) first")
    return state


@contextmanager
def disable_shortv(model: nn.Module) -> Iterator[nn.Module]:
    """Run the unpatched computation inside the block (e.g. a baseline next to ShortV) without removing it."""
    state = _require_state(model)
    previous = state.enabled
    state.enabled = False
    try:
        yield model
    finally:
        state.enabled = previous


@contextmanager
def using_visual_mask(model: nn.Module, visual_mask: torch.Tensor) -> Iterator[nn.Module]:
    """Mark visual positions explicitly for every forward in the block, ``generate()`` included.

    For custom MLLMs, bare ``*ForCausalLM`` models and ``inputs_embeds`` callers. ``visual_mask`` (bool, batch x
    seq) covers the prompt's positions; tokens after it (generated ones) are text; generate's beam copies are
    expanded automatically. Works for a model with ShortV or with FastV/VTW (`shortv.pruning`) applied.
    """
    pruning = getattr(_unwrap(model), "_shortv_pruning_state", None)  # FastV/VTW decide through the same entry
    state = pruning.entry if pruning is not None and get_shortv_state(model) is None else _require_state(model)
    previous = state.context_visual_mask, state.context_checked
    state.context_visual_mask, state.context_checked = visual_mask, False
    try:
        yield model
    finally:
        state.context_visual_mask, state.context_checked = previous
