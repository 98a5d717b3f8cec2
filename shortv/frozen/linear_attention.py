"""Compute-skipping ShortV layer for pre-norm layers whose token mixer is a Gated DeltaNet (linear attention).

Residual structure as ``prenorm``: ``x + mixer(norm(x))``, then ``x + mlp(norm(x))``. The mixer is recurrent:
every token goes through the input projections ``in_proj_qkv`` / ``in_proj_b`` / ``in_proj_a``, the causal
convolution and the gated delta rule, because later text tokens read the state the visual tokens wrote, and the
conv/recurrent cache must hold what the unpatched layer leaves there. What a frozen layer skips for visual tokens is
their output: the output gate's projection ``in_proj_z``, the gated norm, ``out_proj`` and the whole MLP (dense or
MoE) run on the text rows only. The delta rule itself runs over every token and its visual outputs are dropped (the
chunked kernel computes outputs and state together).

The mixer's kernels (causal convolution, chunked and recurrent delta rule, padding mask) are the functions of the
module that defines the mixer's class, called exactly as its own ``forward`` calls them, so prefill, chunked prefill
and single-token steps leave the cache bit-identical to the unpatched layer's.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._compat import cache_from_kwargs
from ..layout import TokenLayout
from . import common
from .anatomy import LayerAnatomy
from .hooks import call_mixer_hooks, has_forward_hooks

_PARTS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "conv1d", "norm", "out_proj", "A_log", "dt_bias",
          "layer_idx", "key_dim", "value_dim", "head_k_dim", "head_v_dim", "conv_kernel_size", "activation")
_KERNELS = ("apply_mask_to_padding_states", "causal_conv1d_fn", "causal_conv1d_update",
            "torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")
#: Decoder-layer arguments the mixer does not take (it is called with the cache, the padding mask and the rest).
_LAYER_ONLY = ("position_embeddings", "position_ids", "cache", "past_key_values", "use_cache", "attention_mask")


def unsupported_reason(layer: nn.Module, anatomy: LayerAnatomy) -> str | None:
    mixer = getattr(layer, anatomy.attention, None)
    missing = [name for name in (anatomy.attention, anatomy.input_norm, anatomy.mlp_norm, anatomy.mlp)
               if not hasattr(layer, name)]
    if mixer is not None:
        missing += [f"{anatomy.attention}.{name}" for name in _PARTS if not hasattr(mixer, name)]
        kernels = sys.modules[type(mixer).__module__]
        missing += [f"{kernels.__name__}.{name}" for name in _KERNELS if not hasattr(kernels, name)]
    if missing:
        return (f"{type(layer).__name__} does not have the expected layer anatomy (missing {', '.join(missing)}); "
                f"the fast linear_attention layer supports {anatomy.attention}({', '.join(_PARTS)}), "
                f"{anatomy.input_norm}, {anatomy.mlp_norm}, {anatomy.mlp}; mode='reference' works with any layer")
    return None


def _mix_all_tokens(mixer: nn.Module, hidden: torch.Tensor, cache: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    """The delta rule's output (batch, seq, value heads, value head dim) for every token; updates the cache."""
    kernels = sys.modules[type(mixer).__module__]
    batch, seq, _ = hidden.shape
    index = mixer.layer_idx
    conv_state = cache.get_conv_state(index, state_idx=0) if cache is not None else None
    recurrent_state = cache.get_recurrent_state(index, state_idx=0) if cache is not None else None
    mixed = mixer.in_proj_qkv(hidden).transpose(1, 2)
    b, a = mixer.in_proj_b(hidden), mixer.in_proj_a(hidden)
    weight = mixer.conv1d.weight.squeeze(1)
    if conv_state is not None and seq == 1 and not cache.is_recording_past(index):
        mixed = kernels.causal_conv1d_update(mixed, conv_state, weight, mixer.conv1d.bias, mixer.activation)
    else:
        if cache is not None:
            mixed = cache.update_conv_state(mixed, index, conv_kernel_size=mixer.conv_kernel_size)
        mixed = kernels.causal_conv1d_fn(mixed, weight, mixer.conv1d.bias, activation=mixer.activation, **kwargs)
        if cache is not None:
            mixed = mixed[:, :, -seq:]
    query, key, value = torch.split(mixed.transpose(1, 2), [mixer.key_dim, mixer.key_dim, mixer.value_dim], dim=-1)
    query = query.reshape(batch, seq, -1, mixer.head_k_dim)
    key = key.reshape(batch, seq, -1, mixer.head_k_dim)
    value = value.reshape(batch, seq, -1, mixer.head_v_dim)
    beta = b.sigmoid()
    decay = -mixer.A_log.float().exp() * F.softplus(a.float() + mixer.dt_bias)
    stepwise = recurrent_state is not None and seq == 1
    rule = kernels.torch_recurrent_gated_delta_rule if stepwise else kernels.torch_chunk_gated_delta_rule
    output, state = rule(query, key, value, g=decay, beta=beta, initial_state=recurrent_state,
                         output_final_state=cache is not None, use_qk_l2norm_in_kernel=True,
                         cu_seqlens=kwargs.pop("cu_seq_lens_q", None), **kwargs)
    if cache is not None:
        cache.update_recurrent_state(state, index)
    return output


def mixer_branch(
    mixer: nn.Module, layout: TokenLayout, normed: torch.Tensor, kwargs: dict[str, Any]
) -> torch.Tensor:
    """The mixer's output after ``out_proj`` for the text rows (as `TokenLayout.take_text` gives them); state and
    cache over every token."""
    cache = cache_from_kwargs(kwargs)
    hidden = sys.modules[type(mixer).__module__].apply_mask_to_padding_states(normed, kwargs.get("attention_mask"))
    rest = {key: value for key, value in kwargs.items() if key not in _LAYER_ONLY}
    output = layout.take_text(_mix_all_tokens(mixer, hidden, cache, rest))  # (text rows, value heads, head dim)
    gate = mixer.in_proj_z(layout.take_text(hidden))
    gated = mixer.norm(output.reshape(-1, mixer.head_v_dim), gate.reshape(-1, mixer.head_v_dim))
    text_output = mixer.out_proj(gated.reshape(*output.shape[:-2], -1))
    if has_forward_hooks(mixer):  # user hooks on the mixer see its output in the usual shape
        call_mixer_hooks(mixer, layout, text_output, {"hidden_states": normed, **kwargs})
    return text_output


def fast_frozen_forward(
    layer: nn.Module, anatomy: LayerAnatomy, layout: TokenLayout, hidden_states: torch.Tensor, **kwargs: Any
) -> torch.Tensor:
    normed = getattr(layer, anatomy.input_norm)(hidden_states)
    mixed = mixer_branch(getattr(layer, anatomy.attention), layout, normed, kwargs)
    return common.residual_mlp(layer, anatomy, layout, hidden_states, mixed)
