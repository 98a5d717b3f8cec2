"""Per-architecture facts, as data, keyed by ``config.model_type`` of the top-level model.

Adding a family means adding a row here (and, only if its decoder layer is not Llama-shaped, a module under
``shortv/frozen/``). Nothing outside this file knows model names.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Architecture:
    """What shortv needs to know about one model family."""

    #: Dotted attribute path from the top-level model to its ``nn.ModuleList`` of decoder layers.
    decoder_layers: str
    #: Dotted path to the norm applied after the last decoder layer (before the LM head).
    final_norm: str = ""
    #: Config attributes holding the ids of visual placeholder tokens (one input id per visual feature).
    visual_token_id_attributes: tuple[str, ...] = ()
    #: ``"1d"``: cos/sin per position. ``"mrope"``: 3-D multimodal positions; transformers' rotary module composes
    #: the sections into per-token cos/sin before the decoder layers, so the frozen layer treats both alike.
    rope: str = "1d"
    #: Module under ``shortv.frozen`` with the compute-skipping layer, or None (reference mode only).
    fast_layer: str | None = "llama"
    #: ``model_type`` of the language model (``config.get_text_config()``) the fast layer was verified with.
    fast_text_model_types: tuple[str, ...] = ("llama", "mistral", "qwen2")


_MULTIMODAL = dict(decoder_layers="model.language_model.layers", final_norm="model.language_model.norm")
_CAUSAL_LM = dict(decoder_layers="model.layers", final_norm="model.norm")
_LLAVA_STYLE = dict(**_MULTIMODAL, visual_token_id_attributes=("image_token_id",))
_QWEN_VL = dict(
    **_MULTIMODAL,
    visual_token_id_attributes=("image_token_id", "video_token_id"),
    rope="mrope",
)

ARCHITECTURES: dict[str, Architecture] = {
    # LLaVA-1.5 (Vicuna/Llama or Mistral LM)
    "llava": Architecture(**_LLAVA_STYLE),
    # LLaVA-NeXT (anyres tiles; still one input id per visual feature)
    "llava_next": Architecture(**_LLAVA_STYLE),
    # LLaVA-OneVision (Qwen2 LM; images and video)
    "llava_onevision": Architecture(
        **_MULTIMODAL,
        visual_token_id_attributes=("image_token_id", "video_token_id"),
    ),
    "qwen2_vl": Architecture(**_QWEN_VL, fast_text_model_types=("qwen2_vl_text",)),
    "qwen2_5_vl": Architecture(**_QWEN_VL, fast_text_model_types=("qwen2_5_vl_text",)),
    # Bare causal LMs: the caller says which positions are visual with an explicit mask.
    "llama": Architecture(**_CAUSAL_LM),
    "mistral": Architecture(**_CAUSAL_LM),
    "qwen2": Architecture(**_CAUSAL_LM),
}

#: Used for model types not in the table: reference mode only, layers found through ``get_decoder()``.
GENERIC = Architecture(
    decoder_layers="", visual_token_id_attributes=("image_token_id", "video_token_id"), fast_layer=None
)


def model_type_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def architecture_for(model: nn.Module) -> Architecture:
    return ARCHITECTURES.get(model_type_of(model), GENERIC)


def supported_fast_model_types() -> list[str]:
    return sorted(name for name, arch in ARCHITECTURES.items() if arch.fast_layer is not None)


def _resolve(root: nn.Module, dotted: str) -> object | None:
    obj: object = root
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers: from the registry path, else through ``get_decoder()`` for unknown families."""
    arch = architecture_for(model)
    candidates = []
    if arch.decoder_layers:
        candidates.append(_resolve(model, arch.decoder_layers))
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError):
            decoder = None
        candidates.append(getattr(decoder, "layers", None))
    for layers in candidates:
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    model_type = model_type_of(model)
    raise ValueError(
        f"could not find the decoder layers of {type(model).__name__} (model_type={model_type!r}): "
        "no registry entry path and no `get_decoder().layers`. Add the family to shortv.registry.ARCHITECTURES."
    )


def find_final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last decoder layer and the LM head (registry path, else ``get_decoder().norm``)."""
    arch = architecture_for(model)
    norm = _resolve(model, arch.final_norm) if arch.final_norm else None
    if norm is None and callable(getattr(model, "get_decoder", None)):
        norm = getattr(model.get_decoder(), "norm", None)
    if not isinstance(norm, nn.Module):
        raise ValueError(f"could not find the final norm of {type(model).__name__}; add `final_norm` to its registry entry")
    return norm


def visual_token_ids(model: nn.Module) -> tuple[int, ...]:
    """Input ids that stand for visual features in this model's sequences (empty for bare language models)."""
    config = getattr(model, "config", None)
    ids = []
    for attribute in architecture_for(model).visual_token_id_attributes:
        value = getattr(config, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool):
            ids.append(value)
    return tuple(ids)
