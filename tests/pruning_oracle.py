"""Slow token-pruning oracle: decoder layers ``0..K-1`` on every token, then layers ``K..`` on the kept tokens only.

Kept deliberately plain: it is the definition a FastV / VTW implementation must match. It records what the stock
decoder passes to each layer in one ordinary forward (the layer-0 input and, per layer, the attention mask, the
rotary ``(cos, sin)`` and the position ids), then calls the stock layers itself: all columns up to layer K, and from
layer K on the kept columns only (every non-visual column and the kept visual ones), with their original positions:
the hidden states, the rotary rows, the position ids and the mask's rows and columns are gathered, nothing is
recomputed. Frozen (ShortV) layers run through the reference freeze: the stock layer, then the visual rows put back.

Families: any whose decoder layers take ``(hidden_states, position_embeddings=, attention_mask=, position_ids=)``
and nothing per token besides but a per-layer input, cut like the rest (Llama-like, Qwen-VL M-RoPE, Gemma 3 sliding
windows, Qwen3.5 hybrids, Gemma 4: its KV-sharing layers read what the layers they share with stored in this run, so
the cut must come before those). A decoder that changes the hidden states between its first layers (DeepStack) is
replayed from the input of the first layer after the last such change (the stock forward's own), so the cut must
come after it. Refused with a one-line reason: a layer that takes other per-token tensors.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from shortv.frozen.reference import restore_positions
from shortv.registry import find_decoder_layers, find_final_norm, find_inter_layer_update

#: The tensor arguments of a layer that the oracle cuts down to the kept columns (other tensors are refused; flags,
#: absent caches and Gemma 4's dict of shared keys/values pass through). ``per_layer_input``: Gemma 4's per-token
#: input of each layer (batch, seq, dims), passed positionally.
_PRUNED = {"hidden_states", "attention_mask", "position_embeddings", "position_ids", "per_layer_input"}


@dataclass
class DecoderCalls:
    """What the stock decoder gave its layers in one forward."""

    hidden_states: torch.Tensor  # input of layer ``start``, (batch, seq, hidden)
    kwargs: list[dict]  # per layer
    #: the first layer the oracle runs: 0, or the one after the decoder's last between-layer update (DeepStack).
    start: int = 0


@dataclass
class PrunedOutput:
    hidden_states: torch.Tensor  # after the final norm, (batch, kept columns, hidden)
    columns: torch.Tensor  # (batch, kept columns): the original column of each row, ascending


def _output(value):
    return value[0] if isinstance(value, tuple) else value


@torch.no_grad()
def capture_decoder_calls(model: nn.Module, inputs: dict) -> DecoderCalls:
    """Run ``model(**inputs)`` once and record every layer's keyword arguments and the input of the first layer
    after the last between-layer update (layer 0 without one)."""
    layers = find_decoder_layers(model)
    first: list[torch.Tensor] = []
    kwargs: list[dict] = [{} for _ in layers]
    updates: list[int] = []
    update = find_inter_layer_update(model)
    if update is not None:  # count its calls (one per updated layer) through an instance attribute, removed below
        owner, name = update
        method = getattr(owner, name)
        object.__setattr__(owner, name, lambda *args, **kw: (updates.append(1), method(*args, **kw))[1])

    def recorder(index: int):
        def hook(module, args, layer_kwargs):
            names = list(inspect.signature(module.forward).parameters)
            layer_kwargs = {**dict(zip(names[1:], args[1:])), **layer_kwargs}  # positional ones by name
            unknown = sorted(k for k, v in layer_kwargs.items() if k not in _PRUNED and isinstance(v, torch.Tensor))
            if unknown:
                raise ValueError(f"decoder layer {index} takes per-token inputs the oracle cannot prune: {unknown}")
            first.append(args[0] if args else layer_kwargs["hidden_states"])
            kwargs[index] = {k: v for k, v in layer_kwargs.items() if k != "hidden_states"}
        return hook

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        if update is not None:
            object.__delattr__(owner, name)
    return DecoderCalls(first[len(updates)], kwargs, len(updates))


def _gather(x: torch.Tensor, dim: int, columns: torch.Tensor, batch_dim: int = 0) -> torch.Tensor:
    """``x`` with its sequence dimension ``dim`` cut to ``columns`` (batch, kept), per sample along ``batch_dim``
    (a batch of 1 is broadcast first)."""
    dim, batch_dim = dim % x.dim(), batch_dim % x.dim()
    shape = list(x.shape)
    shape[batch_dim] = columns.shape[0]
    x = x.expand(shape)
    view = [1] * x.dim()
    view[batch_dim], view[dim] = columns.shape
    shape[dim] = columns.shape[1]
    return x.gather(dim, columns.view(view).expand(shape))


def prune_kwargs(kwargs: dict, columns: torch.Tensor) -> dict:
    """A layer's keyword arguments cut to the kept ``columns``: rotary rows, position ids, mask rows and columns."""
    out = dict(kwargs)
    if kwargs.get("per_layer_input") is not None:  # (batch, seq, dims)
        out["per_layer_input"] = _gather(kwargs["per_layer_input"], 1, columns)
    if kwargs.get("position_embeddings") is not None:  # (cos, sin): (batch, seq, d) or (sections, batch, seq, d)
        out["position_embeddings"] = tuple(_gather(x, -2, columns, -3) for x in kwargs["position_embeddings"])
    if kwargs.get("position_ids") is not None:  # (batch, seq) or (sections, batch, seq)
        out["position_ids"] = _gather(kwargs["position_ids"], -1, columns, -2)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"the oracle prunes tensor masks only, got {type(mask).__name__}")
        if mask.dim() == 4:  # (batch, 1, query, key)
            mask = _gather(_gather(mask, -1, columns), -2, columns)
        elif mask.dim() == 2:  # a padding mask (batch, seq)
            mask = _gather(mask, -1, columns)
        else:
            raise ValueError(f"the oracle prunes 2-D and 4-D masks only, got {mask.dim()}-D")
        out["attention_mask"] = mask
    # An absent mask is the causal mask over the sequence as given (no padding, no window cut): on kept columns in
    # ascending order it is again the causal mask.
    return out


def kept_columns(visual_mask: torch.Tensor, kept_visual: torch.Tensor) -> torch.Tensor:
    """(batch, kept) ascending columns: every non-visual column and the visual columns in ``kept_visual``
    (batch, n) (every sample must keep as many columns, so that they stack)."""
    if kept_visual.numel() and not visual_mask.bool().gather(1, kept_visual).all():
        raise ValueError("kept_visual lists a column that is not visual")
    keep = ~visual_mask.bool()
    keep = keep.scatter(1, kept_visual, True) if kept_visual.numel() else keep
    counts = keep.sum(dim=1)
    if not (counts == counts[0]).all():
        raise ValueError(f"samples keep different numbers of columns {counts.tolist()}; run them one by one")
    return keep.nonzero()[:, 1].view(len(keep), -1)


def rank_by_attention(weights: torch.Tensor, visual_mask: torch.Tensor, keep: int, queries: str = "last",
                      last: torch.Tensor | None = None, real: torch.Tensor | None = None):
    """FastV's choice: the ``keep`` visual columns that receive the most attention in ``weights`` (batch, heads,
    query, key; eager attention of layer K - 1), averaged over heads, from the last query row (``"last"``: the last
    prompt token, with left padding or none; ``last`` (batch,): each sample's last real row, with right padding)
    or averaged over every query row (``"mean"``; ``real`` (batch, query) bool: over the real rows only, not the
    padding). Ascending columns; of tied columns, the earlier ones."""
    received = weights.mean(dim=1)
    if queries == "last":
        received = received[:, -1] if last is None else received[torch.arange(len(received)), last]
    elif real is None:
        received = received.mean(dim=1)
    else:
        received = (received * real[:, :, None]).sum(dim=1) / real.sum(dim=1, keepdim=True)
    received = received.masked_fill(~visual_mask.bool(), float("-inf"))
    # Ties (identical visual tokens receive identical attention) go to the earlier column.
    return received.argsort(dim=-1, descending=True, stable=True)[:, :keep].sort(dim=-1).values


def stock_layer(index: int, layer: nn.Module, hidden: torch.Tensor, visual: torch.Tensor, frozen: bool,
                kwargs: dict) -> torch.Tensor:
    """The stock layer; a frozen one then gets its visual rows back as they entered (the reference freeze)."""
    out = _output(layer(hidden, **kwargs))
    return restore_positions(out, hidden, visual) if frozen else out


RunLayer = Callable[[int, nn.Module, torch.Tensor, torch.Tensor, bool, dict], torch.Tensor]


@torch.no_grad()
def pruned_forward(
    model: nn.Module,
    calls: DecoderCalls,
    visual_mask: torch.Tensor,
    cut: int,
    kept_visual: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    frozen_layers=(),
    run_layer: RunLayer = stock_layer,
) -> PrunedOutput:
    """Layers ``0..cut-1`` on every column, layers ``cut..`` on the kept ones; ``kept_visual`` is (batch, n) visual
    columns, or a function of layer ``cut - 1``'s eager attention weights that returns them (see
    `rank_by_attention`). ``run_layer`` runs one layer (default: `stock_layer`)."""
    layers = find_decoder_layers(model)
    if not calls.start < cut <= len(layers):
        raise ValueError(f"cut must be in {calls.start + 1}..{len(layers)}, got {cut}")
    frozen = set(frozen_layers)
    hidden, visual = calls.hidden_states, visual_mask.bool()
    columns = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
    weights: list[torch.Tensor] = []
    handle = None
    if callable(kept_visual):
        handle = layers[cut - 1].self_attn.register_forward_hook(lambda m, a, out: weights.append(out[1]))
    try:
        for index in range(calls.start, cut):
            hidden = run_layer(index, layers[index], hidden, visual, index in frozen, calls.kwargs[index])
    finally:
        if handle is not None:
            handle.remove()
    if callable(kept_visual):
        if not weights or weights[0] is None:
            raise ValueError("ranking by attention needs eager attention weights of layer cut - 1")
        kept_visual = kept_visual(weights[0])
    if cut < len(layers):
        columns = kept_columns(visual, kept_visual.to(visual.device))
        hidden, visual = _gather(hidden, 1, columns), visual.gather(1, columns)
        for index in range(cut, len(layers)):
            kwargs = prune_kwargs(calls.kwargs[index], columns)
            hidden = run_layer(index, layers[index], hidden, visual, index in frozen, kwargs)
    return PrunedOutput(find_final_norm(model)(hidden), columns)


def logits_of(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on ``hidden`` (final-normed), then the logit soft-capping of a model whose forward applies it."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def extend_inputs(inputs: dict, token: torch.Tensor) -> dict:
    """``inputs`` with one more column: ``token`` (batch,) in ``input_ids``, 1 in the padding mask, the next
    position in explicit ``position_ids``, 0 (text) in any other per-token integer tensor (``mm_token_type_ids``)."""
    batch, seq = inputs["input_ids"].shape
    out = dict(inputs)
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2 and tuple(value.shape) == (batch, seq):
            fill = token if key == "input_ids" else torch.full_like(token, 1 if key == "attention_mask" else 0)
            fill = value[:, -1] + 1 if key == "position_ids" else fill
            out[key] = torch.cat([value, fill[:, None].to(value.dtype)], dim=1)
    return out


def sample_calls(calls: DecoderCalls, index: int) -> DecoderCalls:
    """Sample ``index`` of a batch's recorded calls, as a batch of 1 (the batch's padding and positions kept)."""
    def pick(x, batch_dim):
        return x.narrow(batch_dim, index, 1) if x.shape[batch_dim] > 1 else x
    kwargs = []
    for layer_kwargs in calls.kwargs:
        out = dict(layer_kwargs)
        if out.get("position_embeddings") is not None:
            out["position_embeddings"] = tuple(pick(x, -3) for x in out["position_embeddings"])
        if out.get("position_ids") is not None:
            out["position_ids"] = pick(out["position_ids"], -2)
        if isinstance(out.get("attention_mask"), torch.Tensor):
            out["attention_mask"] = pick(out["attention_mask"], 0)
        if out.get("per_layer_input") is not None:
            out["per_layer_input"] = pick(out["per_layer_input"], 0)
        kwargs.append(out)
    return DecoderCalls(calls.hidden_states[index : index + 1], kwargs, calls.start)


@torch.no_grad()
def pruned_greedy(model: nn.Module, inputs: dict, visual_mask: torch.Tensor, cut: int, kept_for: Callable, steps: int,
                  reset: Callable[[nn.Module], None] = lambda model: None, frozen_layers=(),
                  banned=()) -> torch.Tensor:
    """Greedy decoding without a cache: each step re-runs the whole batch (prompt and tokens so far), then
    `pruned_forward` on each sample alone (so samples may keep different numbers of columns), with the visual
    columns kept at the prompt (``kept_for(i)``: sample ``i``'s ``kept_visual``, ranked once, by the prompt's last
    token: generated tokens never re-rank). ``reset(model)`` clears state a model keeps between calls;
    ``frozen_layers``: ShortV layers (reference freeze; generated tokens are text); ``banned``: token ids never
    chosen (EOS under generate's ``min_new_tokens``). Returns (batch, steps)."""
    kept = [kept_for(i) for i in range(len(visual_mask))]
    tokens = []
    for _ in range(steps):
        reset(model)
        calls = capture_decoder_calls(model, inputs)
        seq = inputs["input_ids"].shape[1]
        visual = torch.cat([visual_mask, visual_mask.new_zeros(len(visual_mask), seq - visual_mask.shape[1])], 1)
        token = []
        for i in range(len(visual)):
            out = pruned_forward(model, sample_calls(calls, i), visual[i : i + 1], cut, kept[i], frozen_layers)
            if callable(kept[i]):  # fix the prompt's choice for the later steps
                kept[i] = out.columns[visual[i : i + 1].gather(1, out.columns)].view(1, -1)
            logits = logits_of(model, out.hidden_states[:, -1])
            logits[:, list(banned)] = float("-inf")
            token.append(logits.argmax(dim=-1))
        tokens.append(torch.cat(token))
        inputs = extend_inputs(inputs, tokens[-1])
    return torch.stack(tokens, dim=1)
