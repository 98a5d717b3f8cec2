"""FastV and VTW on a loaded model instance: layers ``K..`` run on the text tokens and the kept visual tokens only.

How it works: the entry hooks of `shortv.entry` decide, once per forward, which positions are visual (input ids,
``visual_mask=``, `using_visual_mask`, ``generate(visual_mask=...)``). Layer ``K - 1``'s ``forward`` is replaced,
on that instance, by `CutForward`: it runs the layer, ranks the visual tokens (`shortv.pruning.ranking`) and returns
the hidden states of the kept columns only, so every later layer, the final norm and the LM head get fewer rows.
Layers ``K..`` get `KeptForward`: it cuts their per-token arguments to the kept columns (cos/sin rows, position ids,
the mask's rows and columns), so each kept token keeps its original position. Their KV cache therefore holds the
kept positions only; the kept prompt columns are recorded on the cache (``cache.shortv_kept_columns``), and every
later step masks those layers' keys by them.

What ``model(...)`` returns on a pruned prompt: logits (and hidden states from layer ``K - 1``'s output on) for
the kept positions only, in order; `kept_columns(model)` gives their original columns. Samples of a batch that keep
fewer columns (fewer visual tokens) get padding slots at the start of their row (column -1 in `kept_columns`,
logits meaningless, hidden from every query by the masks). The last position is always kept, so ``generate``
(which reads the last logits) works unchanged.

Layer kinds: a linear-attention layer from K on gets its 2-D padding mask cut to the kept columns (its conv and
recurrent states are built over the kept tokens); a sliding-window layer from K on (and a full-attention one when
the model lays its step masks out for a pruned layer) gets each step's mask rebuilt by original column. A per-layer
input (Gemma 4) is cut like the rotary rows; layers that reuse another layer's keys/values (KV sharing) need it on
the same side of K (`kv_sources`). See docs/pruning.md for what each family allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import (
    DummyLayer,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionCacheLayerMixin,
    LinearAttentionLayer,
    StaticLayer,
)

from .. import _compat
from ..config import ShortVConfig
from ..entry import ShortVState, entry_modules, install_entry_hooks, remove_entry_hooks
from ..frozen import FastLayer
from ..frozen.anatomy import LayerAnatomy, LayerKinds
from ..frozen.common import SUPPORTED_ATTENTION, attention_implementation
from ..layout import TokenLayout
from ..patch import (
    FrozenForward,
    ShortVGenerate,
    _decoder_layers_path,
    _forward_attribute,
    _InstanceOverride,
    _unwrap,
    get_shortv_state,
)
from ..patch import _check_applicable as _check_shortv
from ..registry import (
    fast_layer_for,
    find_decoder_layers,
    find_inter_layer_update,
    inter_layer_update_layers,
    layer_types,
    model_type_of,
    visual_token_ids,
)
from .columns import decode_kwargs, gather_columns, prefill_kwargs, window_decode_mask
from .config import TokenPruningConfig, check_cut
from .ranking import kept_layout, received_attention, top_visual

STATE_ATTRIBUTE = "_shortv_pruning_state"
#: The anatomy module of a linear-attention (recurrent) layer: its state cannot drop a token once written.
RECURRENT = "linear_attention"
SLIDING = "sliding_attention"
CACHE_ATTRIBUTE = "shortv_kept_columns"


@dataclass
class Plan:
    """What layers ``K..`` do in the forward in flight."""

    prefill: bool
    #: prefill: (batch, width) columns of the prompt; later steps: (batch, cached + new) positions of the layer's keys.
    columns: torch.Tensor
    #: Which of ``columns`` are real (False: a padding slot of a sample that keeps fewer); None: all of them.
    real: torch.Tensor | None = None
    past_length: int = 0
    #: prefill: the visual/text split of the kept rows, for ShortV layers from K on (None: no visual row left).
    layout: TokenLayout | None = None
    #: prefill: the prompt's length (columns before the cut).
    length: int = 0


class PruningState:
    """Everything `apply_token_pruning` attached; plain data and references, so it deep-copies and pickles."""

    def __init__(self, config: TokenPruningConfig, entry: ShortVState, anatomy: LayerAnatomy, fast: FastLayer):
        self.config, self.entry, self.anatomy, self.fast = config, entry, anatomy, fast
        #: the decoder layers with a sliding window (their dynamic cache layers hold a window of kept positions).
        self.sliding: frozenset[int] = frozenset()
        self.plan: Plan | None = None
        #: (batch, kept) original columns of the rows of the last pruned forward's output.
        self.last_columns: torch.Tensor | None = None
        self.padding: torch.Tensor | None = None  # the 2-D attention mask of the forward in flight


class PaddingPreHook:
    """On every entry module, after `shortv.entry`'s hook: the outermost call of a forward records its 2-D attention
    mask (ranking reads the last real token of each sample) and refuses what a pruned forward cannot return (a loss
    over every position)."""

    def __init__(self, state: PruningState):
        self.state = state

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.state.entry.depth != 1:  # an inner entry of a forward already recorded
            return
        mask = kwargs.get("attention_mask")
        self.state.padding = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        if kwargs.get("labels") is not None:
            raise ValueError("FastV/VTW return logits for the kept positions only, so the model cannot compute a "
                             "loss over `labels`; remove_token_pruning(model) to train or score every position")


def _kwargs(override: _InstanceOverride, original, hidden: torch.Tensor, args: tuple, kwargs: dict) -> dict:
    return FrozenForward._bind(override, original, hidden, args, kwargs)  # by the original forward's signature


def _check_cache(cache: Any, sliding: frozenset[int]) -> None:
    """A dynamic or static cache whose layers FastV/VTW can hold kept positions in: full-attention, linear-attention,
    and dynamic sliding-window layers where the model's layer is one (``sliding``: their indices); empty layers of
    layers that read another layer's keys/values (KV sharing)."""
    if cache is None:
        return
    layers = getattr(cache, "layers", None)
    allowed = (DynamicLayer, StaticLayer, LinearAttentionLayer, DummyLayer)
    if not isinstance(cache, (DynamicCache, StaticCache)) or not all(
            type(layer) in allowed or (type(layer) is DynamicSlidingWindowLayer and index in sliding)
            for index, layer in enumerate(layers)):
        kinds = sorted({type(layer).__name__ for layer in layers or []})
        raise ValueError(f"FastV/VTW support a dynamic or static cache of full- and linear-attention layers (and "
                         "dynamic sliding-window layers for the model's own), got "
                         f"{type(cache).__name__}{' (' + ', '.join(kinds) + ')' if kinds else ''}")


def _held(cache: Any, indices: range) -> int | None:
    """Positions held by the first key/value layer of ``cache`` among ``indices`` (0: not written yet); None when
    they are all linear-attention layers (whose states count no positions on transformers 5.24)."""
    for index in indices:
        if index >= len(cache.layers):
            return 0
        if not isinstance(cache.layers[index], LinearAttentionCacheLayerMixin):
            return int(cache.get_seq_length(index))
    return None


def _past_length(cache: Any, index: int, seq: int) -> int:
    """Positions cached before this forward (of ``seq`` new ones) in layer ``index`` (K - 1, which sees every token):
    its own count, or in a hybrid model that of the last key/value layer before it (which already ran this forward;
    `_check_applicable` makes sure there is one)."""
    if cache is None:
        return 0
    held = _held(cache, range(index, index + 1))
    if held is not None:
        return held
    return (_held(cache, range(index - 1, -1, -1)) or seq) - seq


def _key_slots(cache: Any, index: int) -> int | None:
    """How many keys layer ``index``'s cache returns when it is a static one (its whole buffer), else None."""
    layer = cache.layers[index] if cache is not None and index < len(cache.layers) else None
    return layer.max_cache_len if isinstance(layer, StaticLayer) else None


class CutForward(_InstanceOverride):
    """``forward`` of layer K - 1: the original, then the ranking and the cut to the kept columns."""

    def __init__(self, state: PruningState, layer: nn.Module, previous: Any, attribute: str, index: int):
        super().__init__(layer, previous)
        self.state, self.attribute, self.index = state, attribute, index

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        state, original = self.state, self.original()
        state.plan = None
        bound = _kwargs(self, original, hidden_states, args, kwargs)
        cache = _compat.cache_from_kwargs(bound)
        _check_cache(cache, state.sliding)
        past = _past_length(cache, self.index, hidden_states.shape[1])
        entry = state.entry
        if not entry.decided:
            raise RuntimeError(
                "FastV/VTW cannot tell which positions of this forward are visual: layer K - 1 ran with only "
                "`inputs_embeds` and no `visual_mask`, or outside a forward of the model. Pass `visual_mask=` "
                "(bool, batch x seq) or use `using_visual_mask(model, mask)`."
            )
        output = original(hidden_states, *args, **kwargs)
        hidden = output[0] if isinstance(output, tuple) else output
        layout = entry.layout
        if layout is not None and layout.shape != tuple(hidden.shape[:2]):
            raise ValueError(f"the visual mask has shape {layout.shape} but layer {self.index} sees a sequence of "
                             f"shape {tuple(hidden.shape[:2])}")
        if layout is not None:  # a prompt with visual tokens: rank and cut
            if past:
                raise ValueError("FastV/VTW prune the visual tokens of a prompt's first forward only; this call "
                                 "brings visual tokens after cached positions (chunked prefill)")
            visual = layout.visual.to(hidden.device)
            columns, real = self._prune(hidden_states, bound, visual)
            rows = visual.gather(1, columns) if real is None else visual.gather(1, columns) & real  # pads: text
            kept = TokenLayout.from_visual_mask(rows) if bool(rows.any()) else None
            state.plan = Plan(prefill=True, columns=columns, real=real, layout=kept, length=hidden.shape[1])
            state.last_columns = columns if real is None else columns.masked_fill(~real, -1)
            if cache is not None:  # the positions layers K.. hold: these columns, then every later one
                setattr(cache, CACHE_ATTRIBUTE, (columns, real, hidden.shape[1]))
            hidden = gather_columns(hidden, 1, columns)
        elif past and getattr(cache, CACHE_ATTRIBUTE, None) is not None:  # a step after a pruned prompt
            kept, real, prompt_length = getattr(cache, CACHE_ATTRIBUTE)
            later = torch.arange(prompt_length, past + hidden.shape[1], device=kept.device)
            later = later.expand(kept.shape[0], -1)
            columns = torch.cat([kept, later], dim=1)
            if real is not None:
                real = torch.cat([real, torch.ones_like(later, dtype=torch.bool)], dim=1)
            held = _held(cache, range(self.index + 1, len(cache.layers)))
            held = columns.shape[1] if held is None else held + hidden.shape[1]  # None: no key/value layer from K
            if columns.shape[1] != held or columns.shape[0] != hidden.shape[0]:
                raise ValueError(f"this KV cache does not match the FastV/VTW prompt it was filled with (layer "
                                 f"{self.index + 1}.. hold {held} positions, expected {columns.shape[1]})")
            state.plan = Plan(prefill=False, columns=columns, real=real, past_length=past)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def _padding(self, visual: torch.Tensor) -> torch.Tensor | None:
        """The forward's 2-D padding mask when it covers this sequence (None: no padding known)."""
        padding = self.state.padding
        return padding if padding is not None and tuple(padding.shape) == tuple(visual.shape) else None

    def _prune(self, hidden_states: torch.Tensor, kwargs: dict, visual: torch.Tensor):
        """(columns, real) of the rows layers K.. run (`shortv.pruning.ranking.kept_layout`)."""
        state = self.state
        keep = torch.tensor([state.config.kept(int(count)) for count in visual.sum(dim=1).tolist()],
                            device=visual.device)
        if int(keep.max()) == 0:
            kept = torch.zeros_like(visual)
        else:
            if kwargs.get("position_embeddings") is None:
                raise RuntimeError(f"FastV ranks in layer {self.index}, which got no `position_embeddings`")
            received = received_attention(self.module, state.anatomy, hidden_states, kwargs.get("attention_mask"),
                                          kwargs["position_embeddings"], state.config.rank, self._padding(visual),
                                          kwargs.get("position_ids"))
            kept = top_visual(received, visual, keep)
        return kept_layout(~visual | kept)


class KeptForward(_InstanceOverride):
    """``forward`` of a layer ``>= K``: its arguments cut to the kept columns (the hidden states already are); a
    ShortV layer (``frozen``) freezes the kept visual rows in a pruned prefill."""

    def __init__(self, state: PruningState, layer: nn.Module, previous: Any, attribute: str, index: int,
                 frozen: bool = False, recurrent: bool = False, window: int | None = None, rebuild: bool = False,
                 per_token: tuple[str, ...] = ()):
        super().__init__(layer, previous)
        self.state, self.attribute, self.index, self.frozen = state, attribute, index, frozen
        #: a linear-attention layer: its 2-D padding mask is cut in prefill; its steps need nothing cut.
        self.recurrent = recurrent
        #: a sliding-window layer's window: its cache keeps the last ``window - 1`` kept positions.
        self.window = window
        #: a full-attention layer whose step masks the model lays out for another cache (a pruned first full layer).
        self.rebuild = rebuild
        #: further per-token arguments cut in prefill (a per-layer input); a step's are the new tokens' already.
        self.per_token = per_token

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        plan, original = self.state.plan, self.original()
        if plan is None or (self.recurrent and not plan.prefill):
            return original(hidden_states, *args, **kwargs)
        bound = _kwargs(self, original, hidden_states, args, kwargs)
        columns = plan.columns.to(hidden_states.device)
        real = None if plan.real is None else plan.real.to(hidden_states.device)
        slots = _key_slots(_compat.cache_from_kwargs(bound), self.index)
        if plan.prefill:
            rows = hidden_states.shape[1]
            if rows < columns.shape[1]:  # the model passes its last query rows only (Gemma 4 past its KV sharing)
                last = torch.arange(plan.length - rows, plan.length, device=columns.device)
                if not bool((columns[:, -rows:] == last).all()):
                    raise ValueError(f"decoder layer {self.index} gets the prompt's last {rows} positions only "
                                     "(logits_to_keep), and FastV/VTW pruned some of them; use logits_to_keep=1 or 0")
            bound = prefill_kwargs(bound, columns, real, slots, self.recurrent, self.per_token, rows)
            if self.frozen and plan.layout is not None:
                layout = plan.layout.to(hidden_states.device)
                layout = layout.tail(rows) if rows < columns.shape[1] else layout  # None: no visual row left
                if layout is not None:
                    return self.state.fast.fast_frozen_forward(self.module, layout, hidden_states, **bound)
        elif self.window is not None or self.rebuild:  # a sliding cache returns its last window - 1 positions
            seq = hidden_states.shape[1]
            keys = columns.shape[1] if self.window is None else min(columns.shape[1] - seq, self.window - 1) + seq
            bound["attention_mask"] = window_decode_mask(self.state.padding, columns[:, -keys:],
                                                         None if real is None else real[:, -keys:],
                                                         plan.past_length, seq, self.window)
        else:
            bound = decode_kwargs(bound, columns, real, plan.past_length, hidden_states.shape[1], slots)
        return original(hidden_states, **bound)


def layer_anatomies(fast: FastLayer | None, layers: nn.ModuleList) -> list[LayerAnatomy] | None:
    """Each decoder layer's anatomy (one per layer type in a hybrid model), or None where one is not known."""
    anatomy = getattr(fast, "anatomy", None)
    if isinstance(anatomy, LayerAnatomy):
        return [anatomy] * len(layers)
    anatomies = [anatomy.anatomy_of(layer) for layer in layers] if isinstance(anatomy, LayerKinds) else [None]
    return anatomies if all(isinstance(each, LayerAnatomy) for each in anatomies) else None


def kv_sources(layers: nn.ModuleList, anatomies: list[LayerAnatomy]) -> dict[int, int]:
    """{layer that reads another layer's keys/values: the layer that writes them} (KV sharing, `LayerAnatomy`): the
    last earlier layer of the same ``attention.layer_type`` with ``attention.store_full_length_kv`` (-1: none)."""
    attentions = [getattr(layer, anatomy.attention) for layer, anatomy in zip(layers, anatomies)]
    sources = {}
    for index, (attention, anatomy) in enumerate(zip(attentions, anatomies)):
        if anatomy.kv_sharing and getattr(attention, "is_kv_shared_layer", False):
            writers = [source for source in range(index) if getattr(attentions[source], "store_full_length_kv", False)
                       and getattr(attentions[source], "layer_type", None) == attention.layer_type]
            sources[index] = writers[-1] if writers else -1
    return sources


def get_pruning_state(model: nn.Module) -> PruningState | None:
    return getattr(_unwrap(model), STATE_ATTRIBUTE, None)


@dataclass
class LayerPlan:
    """What `_check_applicable` learnt of the decoder layers, for `apply_token_pruning` to wire them."""

    #: each layer's anatomy (one per layer type in a hybrid model)
    anatomies: list[LayerAnatomy]
    #: each layer's type (``full_attention``, ``sliding_attention``, ``linear_attention``)
    kinds: list[str]
    #: the sliding-window layers' window (None: the model has none)
    window: int | None


def _check_applicable(model: nn.Module, config: TokenPruningConfig, layers: nn.ModuleList) -> LayerPlan:
    name = f"{config.method.upper() if config.method == 'vtw' else 'FastV'}"
    check_cut(config.k, len(layers))
    if get_shortv_state(model) is not None:
        raise ValueError(f"{name} on a model with apply_shortv's ShortV is not supported; remove_shortv(model) and "
                         "put the layers in TokenPruningConfig(shortv_layers=...)")
    if config.shortv_layers:
        _check_shortv(model, ShortVConfig(layers=config.shortv_layers), layers)
    fast = fast_layer_for(model)
    anatomies = layer_anatomies(fast, layers)
    if anatomies is None:
        raise ValueError(f"{name} does not support model_type={model_type_of(model)!r} (no verified layer anatomy); "
                         "it supports the families whose decoder layers are softmax or linear attention with a fast "
                         "ShortV anatomy")
    sources = kv_sources(layers, anatomies)
    valid = [k for k in range(1, len(layers)) if all(source >= k for reader, source in sources.items() if reader >= k)]
    if config.k not in valid:
        pairs = ", ".join(f"{reader} <- {source}" for reader, source in sorted(sources.items()))
        raise ValueError(f"{name} on {type(model).__name__} needs K in {valid}: layers reuse the keys and values of "
                         f"earlier layers ({pairs}), and a layer from K on must read those of a layer from K on")
    if find_inter_layer_update(model) is not None:
        updated = inter_layer_update_layers(model)
        if updated is None:
            raise ValueError(f"{name} does not support model_type={model_type_of(model)!r}: it adds visual features to "
                             "the hidden states between decoder layers, after layers not known to shortv")
        if config.k <= updated:
            raise ValueError(f"{name} on {type(model).__name__} needs K >= {updated + 1}: it adds visual features to "
                             f"the hidden states after decoder layers 0..{updated - 1} (DeepStack), at positions "
                             "pruning would remove")
    recurrent = [anatomy.module == RECURRENT for anatomy in anatomies]
    kinds = layer_types(model) or ["full_attention"] * len(layers)
    types = sorted(set(kinds) - {"full_attention", SLIDING} - ({"linear_attention"} if any(recurrent) else set()))
    if types:
        raise ValueError(f"{name} supports full-attention, sliding-window and linear-attention layers only; "
                         f"{type(model).__name__} has {types} layers")
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    if SLIDING in kinds and not (isinstance(window, int) and window > 0):
        raise ValueError(f"{name} needs the sliding window of {type(model).__name__}'s sliding-window layers "
                         f"(config.sliding_window), got {window!r}")
    first_full = kinds.index("full_attention") if "full_attention" in kinds else len(layers)
    if config.k <= first_full and (any(recurrent[:first_full]) or first_full == len(layers)):
        raise ValueError(f"{name} on {type(model).__name__} needs K > {first_full}: the model counts the cached "
                         f"positions by its first full-attention layer, {first_full}, when linear-attention layers come "
                         "before it, and that layer must hold every token")
    if config.method == "fastv" and recurrent[config.k - 1]:
        valid = [index + 1 for index, linear in enumerate(recurrent[:-1]) if not linear]
        raise ValueError(f"FastV ranks by the softmax attention of layer K - 1 = {config.k - 1}, a linear-attention "
                         f"layer of {type(model).__name__}; K must be one of {valid}")
    reason = fast.unsupported_reason(layers[config.k - 1])
    if reason is not None:
        raise ValueError(f"{name} cannot rank in decoder layer {config.k - 1}: {reason}")
    softmax = [index for index, linear in enumerate(recurrent) if not linear]
    implementation = attention_implementation(getattr(layers[softmax[0]], anatomies[softmax[0]].attention))
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(f"{name} supports attn_implementation {SUPPORTED_ATTENTION}, got {implementation!r}")
    return LayerPlan(anatomies, kinds, window)


def apply_token_pruning(model: nn.Module, config: TokenPruningConfig) -> nn.Module:
    """Apply FastV or VTW to ``model`` in place (every check first: an error leaves it untouched); returns it."""
    _compat.check_transformers_version()
    if not isinstance(config, TokenPruningConfig):
        raise TypeError(f"apply_token_pruning expects a TokenPruningConfig, got {type(config).__name__}")
    wrapper, model = model, _unwrap(model)
    layers = find_decoder_layers(model)
    plan = _check_applicable(model, config, layers)
    anatomies, kinds, window = plan.anatomies, plan.kinds, plan.window
    entries = entry_modules(model, _decoder_layers_path(model, layers))
    if get_pruning_state(model) is not None:
        remove_token_pruning(model)
    # The entry machinery decides the visual positions per forward (for any non-empty ShortVConfig); ShortV layers
    # before K are ShortV's own `FrozenForward` over that decision, layer K - 1's under the cut.
    frozen = set(config.shortv_layers)
    early = sorted(index for index in frozen if index < config.k)
    entry = ShortVState(config=ShortVConfig(layers=early or [config.k - 1]), num_layers=len(layers),
                        token_ids=visual_token_ids(model))
    fast = fast_layer_for(model)
    state = PruningState(config, entry, anatomies[config.k - 1], fast)

    def override(make, module: nn.Module) -> None:
        attribute = _forward_attribute(module) if make is not ShortVGenerate else "generate"
        instance = make(module, module.__dict__.get(attribute), attribute)
        object.__setattr__(module, instance.attribute, instance)
        entry.patched.append((module, instance.attribute, instance.previous))

    for index in early:
        override(lambda layer, previous, attribute: FrozenForward(entry, layer, previous, fast, attribute),
                 layers[index])
    override(lambda layer, previous, attribute: CutForward(state, layer, previous, attribute, config.k - 1),
             layers[config.k - 1])
    state.sliding = frozenset(index for index, kind in enumerate(kinds) if kind == SLIDING)
    rebuild = config.k <= kinds.index("full_attention")  # the model lays its step masks out for a pruned layer
    per_token = tuple(dict.fromkeys(anatomy.per_layer_input.argument for anatomy in anatomies
                                    if anatomy.per_layer_input))
    for index in range(config.k, len(layers)):
        override(lambda layer, previous, attribute, index=index: KeptForward(
            state, layer, previous, attribute, index, index in frozen, anatomies[index].module == RECURRENT,
            window if kinds[index] == SLIDING else None, rebuild and kinds[index] == "full_attention", per_token),
            layers[index])
    if callable(getattr(model, "generate", None)):
        override(lambda model, previous, attribute: ShortVGenerate(entry, model, previous), model)
    install_entry_hooks(entry, entries)
    for module in entries:
        module.register_forward_pre_hook(PaddingPreHook(state), with_kwargs=True)
    object.__setattr__(model, STATE_ATTRIBUTE, state)
    return wrapper


def apply_fastv(model: nn.Module, k: int = 2, ratio: float = 0.5, rank: str = "last") -> nn.Module:
    """FastV: after layer ``k - 1``, keep the ``1 - ratio`` most attended visual tokens of each sample."""
    return apply_token_pruning(model, TokenPruningConfig("fastv", k, ratio, rank))


def apply_vtw(model: nn.Module, k: int) -> nn.Module:
    """VTW: from layer ``k`` on, every visual token leaves the sequence (hidden states and KV cache)."""
    return apply_token_pruning(model, TokenPruningConfig("vtw", k))


def remove_token_pruning(model: nn.Module) -> nn.Module:
    """Undo `apply_token_pruning` exactly. A model without it is returned unchanged."""
    state = get_pruning_state(model)
    if state is None:
        return model
    for module, attribute, previous in reversed(state.entry.patched):  # layer K - 1 may hold two, stacked
        if previous is None:
            object.__delattr__(module, attribute)
        else:
            object.__setattr__(module, attribute, previous)
    for module in state.entry.entries:
        hooks = module._forward_pre_hooks
        for hook_id in [key for key, hook in hooks.items() if getattr(hook, "state", None) is state]:
            del hooks[hook_id]
            module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
    remove_entry_hooks(state.entry)
    object.__delattr__(_unwrap(model), STATE_ATTRIBUTE)
    return model


def kept_columns(model: nn.Module) -> torch.Tensor | None:
    """(batch, kept) original columns of the rows the last pruned forward returned (None before any)."""
    state = get_pruning_state(model)
    if state is None:
        raise ValueError("this model has no FastV/VTW applied; call apply_fastv / apply_vtw first")
    return state.last_columns
