"""Apply ShortV to a loaded model *instance* (never to transformers classes), remove it, switch it off for a while.

How it works: a forward pre-hook on the top-level model derives the visual mask once per forward (from
``input_ids`` and the model's visual token ids, or from an explicit ``visual_mask``) and stores it in the model's
ShortV state; each chosen decoder layer's ``forward`` is replaced, on that layer instance only, by a frozen forward
that reads the state. Removing restores the exact original attributes, so outputs become bit-identical again.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import _compat
from .config import ShortVConfig
from .frozen.reference import reference_frozen_forward
from .layout import TokenLayout
from .registry import (
    architecture_for,
    fast_layer_for,
    find_decoder_layers,
    model_type_of,
    supported_fast_model_types,
    visual_token_ids,
)

STATE_ATTRIBUTE = "_shortv_state"
_MISSING = object()


@dataclass
class _PatchedLayer:
    module: nn.Module
    attribute: str  # "forward", or "_old_forward" when accelerate's hooks own "forward"
    previous: Any  # the instance attribute we replaced, or _MISSING when it was the class method


@dataclass
class ShortVState:
    """Everything apply_shortv attached to a model; enough to undo it exactly."""

    config: ShortVConfig
    num_layers: int
    token_ids: tuple[int, ...]
    patched: list[_PatchedLayer] = field(default_factory=list)
    hooks: list[Any] = field(default_factory=list)
    enabled: bool = True
    #: Explicit mask set by `using_visual_mask`, covering absolute positions [0, width).
    context_visual_mask: torch.Tensor | None = None
    #: Layout of the forward in flight (None: nothing to freeze).
    layout: TokenLayout | None = None


def _coerce_config(config_or_layers: ShortVConfig | list[int] | tuple[int, ...]) -> ShortVConfig:
    if isinstance(config_or_layers, ShortVConfig):
        return config_or_layers
    if isinstance(config_or_layers, (list, tuple, range)):
        return ShortVConfig(layers=list(config_or_layers))
    raise TypeError(
        f"apply_shortv expects a ShortVConfig or a list of layer indices, got {type(config_or_layers).__name__}"
    )


def _check_applicable(model: nn.Module, config: ShortVConfig, layers: nn.ModuleList) -> None:
    """Every reason this config cannot be applied to this model, raised before anything is changed."""
    out_of_range = [index for index in config.layers if index >= len(layers)]
    if out_of_range:
        raise ValueError(
            f"ShortV layer index {out_of_range[0]} is out of range: {type(model).__name__} has {len(layers)} decoder "
            f"layers, valid indices are 0..{len(layers) - 1}"
        )
    if config.mode != "fast" or not config.layers:
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
    for index in config.frozen_layers:
        reason = fast_module.unsupported_reason(layers[index])
        if reason is not None:
            raise ValueError(f"cannot apply the fast ShortV layer to decoder layer {index}: {reason}")


def _forward_attribute(module: nn.Module) -> str:
    # accelerate's device_map hooks replace `forward` and call `_old_forward`; patching the latter keeps their
    # input/output device moves around our frozen forward.
    return "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"


def _call_with_bound_arguments(original: Callable[..., Any]) -> Callable[..., tuple[torch.Tensor, dict[str, Any]]]:
    """Turn (hidden_states, *args, **kwargs) into (hidden_states, kwargs) using the original forward's signature."""
    signature = inspect.signature(original)

    def bind(hidden_states: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        if not args:
            return dict(kwargs)
        bound = signature.bind_partial(hidden_states, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop(next(iter(signature.parameters)))
        extra = {name: arguments.pop(name) for name, param in signature.parameters.items()
                 if param.kind is inspect.Parameter.VAR_KEYWORD and name in arguments}
        for values in extra.values():
            arguments.update(values)
        return arguments

    return bind


def _make_frozen_forward(state: ShortVState, layer: nn.Module, original: Callable[..., Any], fast: Any) -> Callable:
    bind = _call_with_bound_arguments(original)

    @functools.wraps(original)
    def frozen_forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        layout = state.layout
        if not state.enabled or layout is None:
            return original(hidden_states, *args, **kwargs)
        if tuple(hidden_states.shape[:2]) != layout.shape:
            raise ValueError(
                f"ShortV visual mask has shape {layout.shape} but decoder layer sees a sequence of shape "
                f"{tuple(hidden_states.shape[:2])}; pass a `visual_mask` (batch x seq) that matches the decoder input"
            )
        layout = layout.to(hidden_states.device)
        if fast is None:
            frozen = layout.visual if state.config.frozen_tokens == "visual" else layout.text
            return reference_frozen_forward(original, frozen, hidden_states, *args, **kwargs)
        return fast.fast_frozen_forward(layer, layout, hidden_states, **bind(hidden_states, args, kwargs))

    return frozen_forward


def _explicit_layout(mask: Any, shape: tuple[int, int], past_length: int) -> TokenLayout | None:
    """Layout of the current chunk from a mask covering absolute positions [0, width) of every sample."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"visual_mask must be a torch.Tensor (bool, batch x seq), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex or not bool(((mask == 0) | (mask == 1)).all()):
            raise TypeError(f"visual_mask must be boolean (or integer 0/1), got dtype {mask.dtype}")
        mask = mask.bool()
    batch, seq = shape
    if mask.dim() != 2 or mask.shape[0] != batch or (past_length == 0 and mask.shape[1] != seq):
        raise ValueError(
            f"visual_mask has shape {tuple(mask.shape)} but the input has shape ({batch}, {seq}); "
            "it must be a bool tensor of shape (batch, seq) marking visual positions"
        )
    chunk = mask[:, past_length : past_length + seq]
    if chunk.shape[1] < seq:  # positions past the mask (generated tokens) are text
        chunk = torch.cat([chunk, chunk.new_zeros(batch, seq - chunk.shape[1])], dim=1)
    return TokenLayout.from_visual_mask(chunk) if bool(chunk.any()) else None


def _input_shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[int, int] | None, torch.Tensor | None]:
    input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    if input_ids is not None:
        return tuple(input_ids.shape[:2]), input_ids  # type: ignore[return-value]
    embeds = kwargs.get("inputs_embeds")
    if embeds is not None:
        return tuple(embeds.shape[:2]), None  # type: ignore[return-value]
    return None, None


def _make_pre_hook(state: ShortVState) -> Callable:
    def before_forward(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        explicit = kwargs.pop("visual_mask", None)
        if explicit is None:
            explicit = state.context_visual_mask
        state.layout = None
        if not state.enabled or not state.config.layers:
            return args, kwargs
        shape, input_ids = _input_shape(args, kwargs)
        if shape is None:
            return args, kwargs
        past_length = _compat.cached_length(_compat.cache_from_kwargs(kwargs))
        if explicit is not None:
            state.layout = _explicit_layout(explicit, shape, past_length)
        elif input_ids is not None and state.token_ids:
            ids = torch.tensor(state.token_ids, device=input_ids.device)
            visual = torch.isin(input_ids, ids)
            state.layout = TokenLayout.from_visual_mask(visual) if bool(visual.any()) else None
        elif input_ids is None and past_length == 0:
            warnings.warn(
                "ShortV cannot see which positions are visual when only `inputs_embeds` is given; pass "
                "`visual_mask=` (bool, batch x seq). Running this forward without freezing.",
                stacklevel=2,
            )
        return args, kwargs

    return before_forward


def _make_post_hook(state: ShortVState) -> Callable:
    def after_forward(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        state.layout = None

    return after_forward


def _make_generate(state: ShortVState, original: Callable[..., Any]) -> Callable[..., Any]:
    """``generate(..., visual_mask=m)``: generate() rejects unknown kwargs, so the mask goes through the state."""

    @functools.wraps(original)
    def generate(*args: Any, visual_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if visual_mask is None:
            return original(*args, **kwargs)
        previous = state.context_visual_mask
        state.context_visual_mask = visual_mask
        try:
            return original(*args, **kwargs)
        finally:
            state.context_visual_mask = previous

    return generate


def get_shortv_state(model: nn.Module) -> ShortVState | None:
    return getattr(model, STATE_ATTRIBUTE, None)


def apply_shortv(model: nn.Module, config_or_layers: ShortVConfig | list[int] | tuple[int, ...]) -> nn.Module:
    """Freeze visual tokens in the configured decoder layers of ``model``, in place; returns ``model``.

    Applying again replaces the previous configuration. Every check runs before the model is touched, so an error
    leaves the model exactly as it was.
    """
    _compat.check_transformers_version()
    config = _coerce_config(config_or_layers)
    layers = find_decoder_layers(model)
    _check_applicable(model, config, layers)

    if get_shortv_state(model) is not None:
        remove_shortv(model)
    fast = fast_layer_for(model) if config.mode == "fast" else None
    state = ShortVState(config=config, num_layers=len(layers), token_ids=visual_token_ids(model))
    for index in sorted(config.frozen_layers):
        layer = layers[index]
        attribute = _forward_attribute(layer)
        previous = layer.__dict__.get(attribute, _MISSING)
        original = getattr(layer, attribute)
        object.__setattr__(layer, attribute, _make_frozen_forward(state, layer, original, fast))
        state.patched.append(_PatchedLayer(layer, attribute, previous))
    if callable(getattr(model, "generate", None)):
        previous = model.__dict__.get("generate", _MISSING)
        object.__setattr__(model, "generate", _make_generate(state, model.generate))
        state.patched.append(_PatchedLayer(model, "generate", previous))
    state.hooks.append(model.register_forward_pre_hook(_make_pre_hook(state), with_kwargs=True, prepend=True))
    state.hooks.append(model.register_forward_hook(_make_post_hook(state), with_kwargs=True, always_call=True))
    object.__setattr__(model, STATE_ATTRIBUTE, state)
    return model


def remove_shortv(model: nn.Module) -> nn.Module:
    """Undo `apply_shortv` exactly: original forwards and no hooks. A model without ShortV is returned unchanged."""
    state = get_shortv_state(model)
    if state is None:
        return model
    for patched in state.patched:
        if patched.previous is _MISSING:
            object.__delattr__(patched.module, patched.attribute)
        else:
            object.__setattr__(patched.module, patched.attribute, patched.previous)
    for handle in state.hooks:
        handle.remove()
    object.__delattr__(model, STATE_ATTRIBUTE)
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
    seq) covers the prompt; tokens generated after it are text.
    """
    state = _require_state(model)
    previous = state.context_visual_mask
    state.context_visual_mask = visual_mask
    try:
        yield model
    finally:
        state.context_visual_mask = previous
