"""Per-architecture facts, as data, keyed by ``config.model_type`` of the top-level model.

Two tables: `ARCHITECTURES` (per multimodal family: where the decoder layers live, which input ids are visual, which
language models its fast path was verified with) and `LANGUAGE_MODELS` (per language model: the anatomy of its
decoder layer, `shortv.frozen.anatomy.LayerAnatomy`). Adding a family means adding rows here, and a module under
``shortv/frozen/`` only for a new residual structure. Nothing outside this file knows model names.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .frozen import FastLayer, LayerAnatomy, LayerKinds, ParallelMoE, PerLayerInput, fast_layer_module


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
    #: Language models (``config.get_text_config().model_type``) the fast layer was verified with in this family;
    #: each needs a row in `LANGUAGE_MODELS`. Empty: reference mode only.
    fast_text_model_types: tuple[str, ...] = ("llama", "mistral", "qwen2")
    #: Dotted path to a method the decoder calls on the hidden states *between* two layers, outside them, as
    #: ``method(hidden_states, *args)`` (Qwen3-VL's DeepStack adds vision features at the visual positions after
    #: the first layers). Frozen layers need nothing for it; LC calibration replays those calls.
    inter_layer_update: str = ""
    #: Dotted config path of a list whose length is how many leading decoder layers ``inter_layer_update`` follows
    #: (token pruning must cut after all of them). Empty: not known.
    inter_layer_update_layers: str = ""


# Layer anatomies (see shortv.frozen.anatomy). Pre-norm: norm, attention, residual, norm, MLP, residual.
_PRE_NORM = LayerAnatomy()
_PRE_NORM_QK_NORM = LayerAnatomy(qk_norm=True)
# Qwen3.5 / 3.6 (dense and MoE; MiniCPM-V 4.6 / 4.7 use the same text model): three Gated DeltaNet layers to one
# full-attention layer (QK-norm, output gate, partial RoPE), by `config.layer_types` (each layer's `block_type`).
_HYBRID_LINEAR_FULL = LayerKinds(
    type_attribute="block_type",
    anatomies=(
        ("linear_attention", LayerAnatomy(module="linear_attention", attention="linear_attn")),
        ("full_attention", LayerAnatomy(qk_norm=True, output_gate=True)),
    ),
)
# Gemma 4: sandwich norms, QK-norm and value norm, keys as values on global layers without v_proj, keys/values
# shared by the last layers, an MoE branch beside the MLP, a per-layer-input branch and a scale on the whole output.
_GEMMA4 = LayerAnatomy(
    module="sandwich",
    attention_output_norm="post_attention_layernorm",
    mlp_norm="pre_feedforward_layernorm",
    mlp_output_norm="post_feedforward_layernorm",
    qk_norm=True,
    value_norm=True,
    value_from_key=True,
    kv_sharing=True,
    parallel_moe=ParallelMoE(enabled="enable_moe_block", router="router", experts="experts",
                             input_norm="pre_feedforward_layernorm_2", output_norm="post_feedforward_layernorm_2",
                             mlp_norm="post_feedforward_layernorm_1"),
    per_layer_input=PerLayerInput(enabled="hidden_size_per_layer_input", gate="per_layer_input_gate",
                                  activation="act_fn", projection="per_layer_projection",
                                  norm="post_per_layer_input_norm", argument="per_layer_input"),
    output_scale="layer_scalar",
)

#: Decoder-layer anatomy of each language model with a fast frozen layer, by ``model_type`` of its text config.
LANGUAGE_MODELS: dict[str, LayerAnatomy | LayerKinds] = {
    "llama": _PRE_NORM,
    "mistral": _PRE_NORM,
    "qwen2": _PRE_NORM,
    "qwen2_vl_text": _PRE_NORM,
    "qwen2_5_vl_text": _PRE_NORM,
    "qwen3": _PRE_NORM_QK_NORM,
    "qwen3_vl_text": _PRE_NORM_QK_NORM,
    "qwen3_vl_moe_text": _PRE_NORM_QK_NORM,  # the sparse MoE block sits in the MLP slot
    # Ministral 3: queries scaled by position after RoPE (Llama-4 attention temperature).
    "ministral3": LayerAnatomy(query_scale="llama4"),
    # Gemma 3: sandwich norms, QK-norm; sliding and global layers differ only in the mask and RoPE they are given.
    "gemma3_text": LayerAnatomy(
        module="sandwich",
        attention_output_norm="post_attention_layernorm",
        mlp_norm="pre_feedforward_layernorm",
        mlp_output_norm="post_feedforward_layernorm",
        qk_norm=True,
    ),
    # GLM-4.1V: sandwich norms, partial RoPE on interleaved pairs.
    "glm4v_text": LayerAnatomy(
        module="sandwich",
        attention_output_norm="post_self_attn_layernorm",
        mlp_norm="post_attention_layernorm",
        mlp_output_norm="post_mlp_layernorm",
        rope="interleaved",
    ),
    "qwen3_5_text": _HYBRID_LINEAR_FULL,
    "qwen3_5_moe_text": _HYBRID_LINEAR_FULL,  # the sparse MoE block (with its shared expert) sits in the MLP slot
    "gemma4_text": _GEMMA4,
}

_MULTIMODAL = dict(decoder_layers="model.language_model.layers", final_norm="model.language_model.norm")
_CAUSAL_LM = dict(decoder_layers="model.layers", final_norm="model.norm")
_LLAVA_STYLE = dict(**_MULTIMODAL, visual_token_id_attributes=("image_token_id",))
_IMAGE_AND_VIDEO = ("image_token_id", "video_token_id")
_QWEN_VL = dict(**_MULTIMODAL, visual_token_id_attributes=_IMAGE_AND_VIDEO, rope="mrope")
_TEXT_MODEL = dict(  # SmolVLM / Idefics3 keep their language model under `model.text_model`
    decoder_layers="model.text_model.layers", final_norm="model.text_model.norm",
    visual_token_id_attributes=("image_token_id",), fast_text_model_types=("llama",),
)
_DEEPSTACK = dict(inter_layer_update="model.language_model._deepstack_process",
                  inter_layer_update_layers="vision_config.deepstack_visual_indexes")

ARCHITECTURES: dict[str, Architecture] = {
    # LLaVA-1.5 (Vicuna/Llama or Mistral LM)
    "llava": Architecture(**_LLAVA_STYLE),
    # LLaVA-NeXT (anyres tiles; still one input id per visual feature)
    "llava_next": Architecture(**_LLAVA_STYLE),
    # LLaVA-OneVision (Qwen2 LM; images and video)
    "llava_onevision": Architecture(**_MULTIMODAL, visual_token_id_attributes=_IMAGE_AND_VIDEO),
    "qwen2_vl": Architecture(**_QWEN_VL, fast_text_model_types=("qwen2_vl_text",)),
    "qwen2_5_vl": Architecture(**_QWEN_VL, fast_text_model_types=("qwen2_5_vl_text",)),
    # Qwen3-VL, dense and MoE: QK-norm, interleaved M-RoPE, DeepStack between the first layers.
    "qwen3_vl": Architecture(**_QWEN_VL, fast_text_model_types=("qwen3_vl_text",), **_DEEPSTACK),
    "qwen3_vl_moe": Architecture(
        **_QWEN_VL, fast_text_model_types=("qwen3_vl_moe_text",), **_DEEPSTACK
    ),
    # InternVL 3 / 3.5 (Qwen2, Qwen3 or Llama LM); video frames use the image token.
    "internvl": Architecture(**_LLAVA_STYLE, fast_text_model_types=("qwen2", "qwen3", "llama")),
    "smolvlm": Architecture(**_TEXT_MODEL),
    "idefics3": Architecture(**_TEXT_MODEL),
    # Mistral 3.1 / Ministral 3 (Pixtral vision). [IMG_BREAK] / [IMG_END] are text ids: not frozen.
    "mistral3": Architecture(**_LLAVA_STYLE, fast_text_model_types=("mistral", "ministral3")),
    "gemma3": Architecture(**_LLAVA_STYLE, fast_text_model_types=("gemma3_text",)),
    # GLM-4.1V: video frames use the image token too.
    "glm4v": Architecture(**_QWEN_VL, fast_text_model_types=("glm4v_text",)),
    # Qwen3.5 / 3.6, dense and MoE: hybrid linear/full attention, interleaved M-RoPE (no DeepStack).
    "qwen3_5": Architecture(**_QWEN_VL, fast_text_model_types=("qwen3_5_text",)),
    "qwen3_5_moe": Architecture(**_QWEN_VL, fast_text_model_types=("qwen3_5_moe_text",)),
    # MiniCPM-V 4.6 / 4.7: Qwen3.5 text model, 1-D positions.
    "minicpmv4_6": Architecture(**_MULTIMODAL, visual_token_id_attributes=_IMAGE_AND_VIDEO,
                                fast_text_model_types=("qwen3_5_text",)),
    "minicpmv4_7": Architecture(**_MULTIMODAL, visual_token_id_attributes=_IMAGE_AND_VIDEO,
                                fast_text_model_types=("qwen3_5_text",)),
    # Gemma 4: images and video are visual; audio soft tokens are not (they stay text).
    "gemma4": Architecture(**_MULTIMODAL, visual_token_id_attributes=_IMAGE_AND_VIDEO,
                           fast_text_model_types=("gemma4_text",)),
    # Bare causal LMs: the caller says which positions are visual with an explicit mask.
    "llama": Architecture(**_CAUSAL_LM),
    "mistral": Architecture(**_CAUSAL_LM),
    "qwen2": Architecture(**_CAUSAL_LM),
    "qwen3": Architecture(**_CAUSAL_LM, fast_text_model_types=("qwen3",)),
    "gemma3_text": Architecture(**_CAUSAL_LM, fast_text_model_types=("gemma3_text",)),
    "qwen3_5_text": Architecture(**_CAUSAL_LM, fast_text_model_types=("qwen3_5_text",)),
    "gemma4_text": Architecture(**_CAUSAL_LM, fast_text_model_types=("gemma4_text",)),
}

#: Used for model types not in the table: reference mode only, layers found through ``get_decoder()``.
GENERIC = Architecture(decoder_layers="", visual_token_id_attributes=_IMAGE_AND_VIDEO, fast_text_model_types=())


def model_type_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def architecture_for(model: nn.Module) -> Architecture:
    return ARCHITECTURES.get(model_type_of(model), GENERIC)


def supported_fast_model_types() -> list[str]:
    return sorted(name for name, arch in ARCHITECTURES.items() if arch.fast_text_model_types)


def text_model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "model_type", None)


def layer_types(model: nn.Module) -> list[str] | None:
    """The kind of every decoder layer (``config.layer_types`` of the text config, e.g. linear/full attention)."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(text_config, "layer_types", None)
    return list(types) if types else None


def fast_layer_for(model: nn.Module) -> FastLayer | None:
    """The fast frozen layer for ``model``'s decoder layers, or None where only reference mode is verified."""
    arch = architecture_for(model)
    text_type = text_model_type(model)
    if text_type not in arch.fast_text_model_types or text_type not in LANGUAGE_MODELS:
        return None
    return fast_layer_module(LANGUAGE_MODELS[text_type])


def find_inter_layer_update(model: nn.Module) -> tuple[nn.Module, str] | None:
    """(module, method name) of the family's between-layer update (`Architecture.inter_layer_update`), if any."""
    path = architecture_for(model).inter_layer_update
    if not path:
        return None
    owner_path, _, name = path.rpartition(".")
    owner = _resolve(model, owner_path)
    if not isinstance(owner, nn.Module) or not callable(getattr(owner, name, None)):
        raise ValueError(f"{type(model).__name__} has no `{path}` (its registry entry's inter_layer_update)")
    return owner, name


def inter_layer_update_layers(model: nn.Module) -> int | None:
    """How many leading decoder layers the between-layer update follows (`Architecture.inter_layer_update_layers`;
    None: the family has no such update or the count is not known)."""
    arch = architecture_for(model)
    listed = _resolve(model.config, arch.inter_layer_update_layers) if arch.inter_layer_update_layers else None
    return len(listed) if arch.inter_layer_update and isinstance(listed, (list, tuple)) else None


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


def layer_anatomy(model: nn.Module, layer: nn.Module) -> LayerAnatomy | None:
    """The anatomy of one decoder layer of ``model`` (`LANGUAGE_MODELS`, by layer type where layers differ), or None
    for a language model without an entry; known whether or not its fast path is verified."""
    anatomy = LANGUAGE_MODELS.get(text_model_type(model))
    return anatomy.anatomy_of(layer) if isinstance(anatomy, LayerKinds) else anatomy
