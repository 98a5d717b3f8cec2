"""CUDA graphs for a ShortV model: its decoder stack compiled with ``torch.compile(mode="reduce-overhead")``, a
static KV cache, and prompts padded to a fixed length bucket (user guide: ``docs/cuda_graphs.md``).

`compile_decoder` replaces, on the instance, the ``forward`` of the module that holds the decoder layers (e.g.
``LlamaModel``, or the ``language_model`` of a LLaVA) by a compiled one, ``fullgraph=True`` and ``dynamic=False``:
embeddings, masks, RoPE and every layer, frozen or not, are then one graph, or compilation fails loudly. ShortV's
entry hooks (which read tensor values to decide the layout) and the model's own wrapper (vision tower, LM head)
run eagerly around it, so nothing in the stack breaks the graph. With a `static_cache` (allocated up front, so its
tensors have fixed addresses) the graph's shapes depend only on:

* the batch size and the prompt length (pad every prompt to a bucket: `pad_to_bucket`, or a processor's
  ``padding="max_length"``);
* the number of text rows per sample in a ShortV layer. Padding counts as text, so within one bucket the text
  count is ``bucket - visual tokens``: fixed as long as every prompt has the same number of visual tokens (one
  image at a fixed resolution); where the image sits in the prompt does not matter;
* the cache length (``max_cache_len``), fixed by the cache;
* prefill or decode (a decode step has no visual token, so ShortV's layers run unpatched).

So a bucket costs two graphs per variant (ShortV, and the baseline under `disable_shortv`): the prefill and the
decode step; each replays as one CUDA graph on a GPU (on a CPU, inductor compiles the same graphs and skips the
CUDA graph). A new bucket, batch size, visual token count or cache length compiles again, up to dynamo's
``recompile_limit`` (8 by default) per code object.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .registry import find_decoder_layers

#: Marks a ``forward`` set by `compile_decoder`, so `uncompile_decoder` removes only its own.
_MARK = "_shortv_compiled_decoder"


def decoder_stack(model: nn.Module) -> nn.Module:
    """The module whose ``layers`` are the model's decoder layers (``LlamaModel``, a VLM's ``language_model``)."""
    layers = find_decoder_layers(model)
    for module in model.modules():
        if any(child is layers for child in module.children()):
            return module
    raise ValueError(f"the decoder layers of {type(model).__name__} have no parent module in it")


def compile_decoder(
    model: nn.Module,
    *,
    mode: str | None = "reduce-overhead",
    backend: Any = "inductor",
    fullgraph: bool = True,
    dynamic: bool | None = False,
    options: dict[str, Any] | None = None,
) -> nn.Module:
    """Compile the decoder stack of ``model`` in place (its ``forward``, on the instance); returns ``model``.

    ``mode="reduce-overhead"`` with the inductor backend records CUDA graphs on a GPU (``mode`` is for inductor
    only; ``options``, inductor's settings, replace it). Apply ShortV before or
    after, either works. ``generate``'s own automatic compilation (of the whole model, for decode steps with a
    static cache) is switched off on this model, so that the stack is not compiled twice. Undo with
    `uncompile_decoder`."""
    stack = decoder_stack(model)
    uncompile_decoder(model)
    compile_options: dict[str, Any] = {"backend": backend, "fullgraph": fullgraph, "dynamic": dynamic}
    if options is not None:
        compile_options["options"] = options
    elif mode is not None and backend == "inductor":  # other backends take no mode
        compile_options["mode"] = mode
    compiled = torch.compile(stack.forward, **compile_options)
    generation_config = getattr(model, "generation_config", None)
    # The mark holds what `uncompile_decoder` puts back: generate's disable_compile before this call.
    setattr(compiled, _MARK, (getattr(generation_config, "disable_compile", None),))
    object.__setattr__(stack, "forward", compiled)
    if generation_config is not None:
        generation_config.disable_compile = True
    return model


def uncompile_decoder(model: nn.Module) -> nn.Module:
    """Undo `compile_decoder` (a no-op on a model it did not compile); returns ``model``."""
    stack = decoder_stack(model)
    mark = getattr(stack.__dict__.get("forward"), _MARK, None)
    if mark is not None:
        object.__delattr__(stack, "forward")
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.disable_compile = mark[0]
    return model


def static_cache(model: nn.Module, batch_size: int, max_cache_len: int) -> Any:
    """A ``StaticCache`` for ``batch_size`` sequences of up to ``max_cache_len`` positions (prompt bucket plus new
    tokens), allocated now on the decoder's device and in its dtype.

    Allocating up front matters: a cache allocated lazily inside the compiled prefill would not have the fixed
    addresses CUDA graphs need. Reuse it across calls (``cache.reset()`` zeroes it in place): a new cache has new
    addresses, which makes CUDA graph trees record the graphs again."""
    from transformers import StaticCache
    from transformers.configuration_utils import get_head_shapes

    if batch_size < 1 or max_cache_len < 1:
        raise ValueError(f"batch_size and max_cache_len must be >= 1, got {batch_size} and {max_cache_len}")
    config = model.config.get_text_config(decoder=True)
    parameter = next(decoder_stack(model).parameters())
    heads, head_dim = get_head_shapes(config)
    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    cache.early_initialization(batch_size=batch_size, num_heads=heads, head_dim=head_dim, dtype=parameter.dtype,
                               device=parameter.device)
    return cache


def pad_to_bucket(
    length: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    visual_mask: torch.Tensor | None = None,
    pad_token_id: int = 0,
) -> dict[str, torch.Tensor]:
    """``input_ids`` (batch, seq), its ``attention_mask`` (default: all ones) and, when given, its ``visual_mask``,
    left-padded to ``length`` positions (padding: ``pad_token_id``, attention 0, not visual).

    Left padding keeps the last position real, which is the one ``generate`` reads. For a processor's output,
    ``processor(..., padding="max_length", max_length=length)`` with ``padding_side="left"`` does the same."""
    batch, seq = input_ids.shape
    if seq > length:
        raise ValueError(f"the prompt has {seq} tokens, more than the bucket's {length}: use a larger bucket")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    extra = length - seq

    def pad(tensor: torch.Tensor, value: Any) -> torch.Tensor:
        return torch.cat([tensor.new_full((batch, extra), value), tensor], dim=1)

    padded = {"input_ids": pad(input_ids, pad_token_id), "attention_mask": pad(attention_mask, 0)}
    if visual_mask is not None:
        if visual_mask.shape != input_ids.shape:
            raise ValueError(f"visual_mask {tuple(visual_mask.shape)} and input_ids {tuple(input_ids.shape)} differ")
        padded["visual_mask"] = pad(visual_mask.bool(), False)
    return padded
