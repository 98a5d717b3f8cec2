"""Which positions of a forward are visual, decided where the inputs enter the model.

Every module on the registry path from the top-level model down to the decoder layers (e.g. ``LlavaForConditional
Generation`` -> ``LlavaModel`` -> ``LlamaModel``) gets a forward pre-hook, so a call into any of them freezes the
same way (``model(...)``, ``model.model(...)``, PEFT calling ``model.forward`` directly, ...). The outermost entry
that can decide does so, once per forward; inner entries reuse its decision. The decision comes from:

1. an explicit ``visual_mask=`` argument of this call: a bool ``(batch, seq)`` tensor for exactly this call's
   tokens, or ``(batch, past + seq)`` covering every position so far (chunked prefill: either rule, nothing else);
2. else the mask of ``using_visual_mask`` / ``generate(visual_mask=...)``: it covers absolute positions
   ``[0, width)`` of the prompt; later positions (generated tokens) are text, also when ``generate(use_cache=False)``
   re-runs the whole sequence (the first forward under the mask is the prompt, which it must cover); generate's beam
   and ``num_return_sequences`` expansion (``repeat_interleave`` of the batch) is applied to it;
3. else ``input_ids`` and the model's visual token ids (in a cached step without ``pixel_values*``, i.e. while
   decoding, a placeholder id is a generated token and counts as text).

A forward that reaches a frozen layer undecided (only ``inputs_embeds`` and no mask, or a layer called directly)
raises instead of silently running unfrozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import _compat
from .config import ShortVConfig
from .layout import TokenLayout


@dataclass
class ShortVState:
    """Everything apply_shortv attached to a model; plain data, so it deep-copies and pickles with the model."""

    config: ShortVConfig
    num_layers: int
    token_ids: tuple[int, ...]
    #: (module, attribute, previous instance value or None when it was the class's) for every attribute we set.
    patched: list[tuple[nn.Module, str, Any]] = field(default_factory=list)
    #: Modules that carry our entry hooks; the first one is the model apply_shortv was called on.
    entries: list[nn.Module] = field(default_factory=list)
    enabled: bool = True
    #: Explicit mask set by `using_visual_mask` or `generate(visual_mask=...)`, covering absolute positions [0, width).
    context_visual_mask: torch.Tensor | None = None
    #: Whether a forward under ``context_visual_mask`` ran (the prompt): later ones may be longer (no-cache decoding).
    context_checked: bool = False
    #: Layout of the forward in flight (None: nothing to freeze); meaningful only while ``decided``.
    layout: TokenLayout | None = None
    decided: bool = False
    depth: int = 0

    def reset(self) -> None:
        self.layout, self.decided, self.depth = None, False, 0


def _as_bool_mask(mask: Any) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"visual_mask must be a torch.Tensor (bool, batch x seq), got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype.is_floating_point or mask.dtype.is_complex or not bool(((mask == 0) | (mask == 1)).all()):
        raise TypeError(f"visual_mask must be boolean (or integer 0/1), got dtype {mask.dtype}")
    return mask.bool()


def call_mask_chunk(mask: Any, shape: tuple[int, int], past_length: int) -> torch.Tensor:
    """The visual mask of this call's tokens from a per-call ``visual_mask`` (rule 1 of the module docstring)."""
    mask = _as_bool_mask(mask)
    batch, seq = shape
    widths = (seq,) if past_length == 0 else (seq, past_length + seq)
    if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] not in widths:
        expected = " or ".join(f"({batch}, {width})" for width in widths)
        raise ValueError(
            f"visual_mask has shape {tuple(mask.shape)} but the input has shape ({batch}, {seq}); it must be "
            f"{expected}: one bool per token of this call"
            + (f", or per position so far ({past_length} cached + {seq} new)" if past_length else "")
        )
    return mask[:, -seq:]


def context_mask_chunk(mask: Any, shape: tuple[int, int], past_length: int, grown: bool = False) -> torch.Tensor:
    """The visual mask of this call's tokens from a prompt-wide mask (rule 2 of the module docstring). ``grown``: the
    prompt was seen, so a longer uncached call holds generated (text) tokens after it."""
    mask = _as_bool_mask(mask)
    batch, seq = shape
    if mask.dim() != 2:
        raise ValueError(f"visual_mask must be 2-D (batch, seq), got shape {tuple(mask.shape)}")
    if mask.shape[0] != batch:
        if batch % mask.shape[0] != 0:
            raise ValueError(
                f"visual_mask has {mask.shape[0]} rows but the input has batch {batch}; it must have one row per "
                "prompt (generate's beams / num_return_sequences copies are expanded automatically)"
            )
        mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)
    if past_length == 0 and mask.shape[1] < seq and not grown:
        raise ValueError(f"visual_mask covers {mask.shape[1]} positions but the prompt has {seq} tokens")
    chunk = mask[:, past_length : past_length + seq]
    if chunk.shape[1] < seq:  # positions past the mask (generated tokens) are text
        chunk = torch.cat([chunk, chunk.new_zeros(batch, seq - chunk.shape[1])], dim=1)
    return chunk


def _input_shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[int, int] | None, torch.Tensor | None]:
    input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    if input_ids is not None:
        return tuple(input_ids.shape[:2]), input_ids  # type: ignore[return-value]
    embeds = kwargs.get("inputs_embeds")
    if embeds is not None:
        return tuple(embeds.shape[:2]), None  # type: ignore[return-value]
    return None, None


def _carries_pixels(kwargs: dict[str, Any]) -> bool:
    """Whether a call brings visual inputs (the processors' ``pixel_values``, ``pixel_values_videos``, ...)."""
    return any(name.startswith("pixel_values") and isinstance(value, torch.Tensor) for name, value in kwargs.items())


def _decide(state: ShortVState, explicit: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Set ``state.layout`` for this forward if this entry's inputs allow it; True when decided."""
    shape, input_ids = _input_shape(args, kwargs)
    if shape is None:
        return False
    past_length = _compat.cached_length(_compat.cache_from_kwargs(kwargs))
    if explicit is not None:
        visual = call_mask_chunk(explicit, shape, past_length)
    elif state.context_visual_mask is not None:
        context = state.context_visual_mask
        if isinstance(context, torch.Tensor) and past_length >= context.shape[-1]:  # past the prompt: text, no sync
            state.layout = None
            return True
        visual = context_mask_chunk(context, shape, past_length, grown=state.context_checked)
        state.context_checked = True
    elif input_ids is not None:
        # A bare language model has no visual ids: nothing is visual unless the caller says so. In a cached step
        # without pixels (decoding), a placeholder id is a generated token, embedded as text, not vision features.
        decoding = past_length > 0 and not _carries_pixels(kwargs)
        if not state.token_ids or decoding:
            # Nothing visual, known without reading a tensor: no device sync in each decode step.
            state.layout = None
            return True
        visual = torch.isin(input_ids, torch.tensor(state.token_ids, device=input_ids.device))
    else:
        return False
    layout = TokenLayout.from_visual_mask(visual)  # the forward's plan, built once; every frozen layer reads it
    state.layout = layout if layout.has_visual else None
    return True


class EntryPreHook:
    """Forward pre-hook of an entry module: pops ``visual_mask`` and decides the layout (module docstring)."""

    def __init__(self, state: ShortVState):
        self.state = state

    # Deciding reads tensor values (``.any()``, the text count), which torch.compile cannot trace: it runs eagerly
    # once per entry, so a compiled model breaks its graph here and nowhere in the frozen layers.
    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        state = self.state
        if module is state.entries[0]:  # the outermost module always starts a fresh forward
            state.reset()
        state.depth += 1
        explicit = kwargs.pop("visual_mask", None)
        if state.decided or not state.enabled:
            return args, kwargs
        if not state.config.layers:
            state.layout, state.decided = None, True
            return args, kwargs
        state.decided = _decide(state, explicit, args, kwargs)
        return args, kwargs


class EntryPostHook:
    """Forward hook (always called) of an entry module: the outermost one clears the forward's layout."""

    def __init__(self, state: ShortVState):
        self.state = state

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        state = self.state
        state.depth = max(0, state.depth - 1)
        if state.depth == 0:
            state.reset()


def entry_modules(model: nn.Module, layers_path: str) -> list[nn.Module]:
    """The model and every module on ``layers_path`` above the decoder layers that takes token inputs."""
    modules, current = [model], model
    for part in layers_path.split(".")[:-1]:
        current = getattr(current, part, None)
        if not isinstance(current, nn.Module):
            break
        if not isinstance(current, nn.ModuleList):
            modules.append(current)
    return modules


def install_entry_hooks(state: ShortVState, modules: list[nn.Module]) -> None:
    for module in modules:
        module.register_forward_pre_hook(EntryPreHook(state), with_kwargs=True, prepend=True)
        module.register_forward_hook(EntryPostHook(state), with_kwargs=True, always_call=True)
    state.entries = list(modules)


def remove_entry_hooks(state: ShortVState) -> None:
    """Remove our hooks from every entry module (by identity of their state, so a deep copy removes its own)."""
    for module in state.entries:
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for hook_id in [key for key, hook in hooks.items() if getattr(hook, "state", None) is state]:
                del hooks[hook_id]
                for flags in (module._forward_pre_hooks_with_kwargs, module._forward_hooks_with_kwargs,
                              module._forward_hooks_always_called):
                    flags.pop(hook_id, None)
    state.entries = []
