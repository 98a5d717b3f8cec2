"""Tiny random-weight model factories for the ShortV parity tests.

Every model is built from transformers config classes only (no hub access), in fp32, from a fixed seed, in
``eval()`` mode, with a selectable attention implementation ("sdpa" or "eager", applied to the text model and the
vision tower). Text models: hidden 64, 4 decoder layers (indices 0..3), 4 query heads / 2 KV heads (GQA),
intermediate 128, vocab 200. Vision towers: hidden 32, 2 layers, images of 8..24 pixels.

API
---
``FAMILIES``
    All family keys. A key is the ``config.model_type`` of the top-level model, except ``"llava_mistral"``, a LLaVA
    (model_type ``"llava"``) whose text model is Mistral instead of Llama. ``MULTIMODAL_FAMILIES`` /
    ``TEXT_ONLY_FAMILIES`` / ``VIDEO_FAMILIES`` split them; ``MODEL_TYPES[family]`` gives the model_type.

``build_model(family, attn_implementation="sdpa", seed=0, init_std=None, text_overrides=None) -> PreTrainedModel``
    ``init_std`` (default: the configs' 0.02) overrides ``initializer_range`` of every (sub)config;
    ``text_overrides`` are extra keyword arguments for the text config (e.g. ``{"sliding_window": 8}``).
    The generation config gets pad/bos/eos ids and ``do_sample=False``.

``build_inputs(model, family, *, batch_layouts=None, padding_side="left", seed=0) -> TinyInputs``
    ``TinyInputs`` is a ``dict`` ready for ``model(**inputs)`` and ``model.generate(**inputs)``; the ground truth
    is carried as attributes, not keys:

    - ``visual_mask``: bool (batch, seq), True at image *and* video token positions (for the bare causal LMs: the
      positions the caller must declare visual); ``image_mask`` / ``video_mask``: the same split per modality.
    - ``layouts``: the resolved per-sample layouts (each with its ``seed``), ``lengths``: unpadded lengths,
      ``visual_items``: per sample, a list of ``(kind, size, n_tokens)`` for each image/video (kind "image"/"video").
    - ``positions(i)``: LongTensor of the columns of sample ``i`` that are not padding.
    - ``sample(i)``: the same sample ``i`` built alone (batch 1, no padding); same token ids, same pixels.
    - ``to(device)``: a copy with every tensor (inputs and masks) moved.

    ``batch_layouts``: one spec per sample (default: ``default_layouts(family)``). A spec is a dict with keys
    (all optional)::

        n_text_before=3, images=0, videos=0, n_text_between=2, n_text_after=4,
        image_sizes=None, video_sizes=None, scatter=False, seed=None, segments=None

    The sequence is: ``n_text_before`` text tokens, then the images (then the videos), ``n_text_between`` text
    tokens between two consecutive visual items, then ``n_text_after`` text tokens. ``segments`` overrides all
    that with an explicit list of ``("text", n)``, ``("image", size)``, ``("video", size)`` in any order.
    Image ``size`` is ``(h, w)`` in pixels (ignored by llava, which always uses its fixed square size); video
    ``size`` is ``(frames, h, w)``. For the bare causal LMs an image/video "size" is the number of visual tokens
    of the block (int) and ``scatter=True`` makes each block alternate visual/text tokens (v t v t ... v).
    Sizes left out cycle through the family's size list starting at an offset given by the sample seed, so
    samples in a batch get different token counts. ``seed`` defaults to ``seed * 10007 + sample_index``; every
    random value of a sample (token ids, pixels) comes from its own seed only, so ``sample(i)`` rebuilds it alone.
    Padding uses ``PAD_ID`` with ``attention_mask`` 0 (left or right).

``single_sample_inputs(inputs, i)``  == ``inputs.sample(i)``.
``reset_state(model)``  clears cached state between unrelated calls (Qwen2-VL's ``model.model.rope_deltas``).
``default_layouts(family, batch_size=3)``  mixed layouts (multi-image, and a video where supported).

Token ids: ``PAD_ID=0, BOS_ID=1, EOS_ID=2``, text tokens in ``[3, 180)``, ``IMAGE_TOKEN_ID=190``,
``VIDEO_TOKEN_ID=191``, ``VISION_START_ID=192``, ``VISION_END_ID=193`` (Qwen2-VL families only).

Per-family notes (token counts come from the model's own vision code when inputs are built, and are checked
against the closed form where there is one; the model's placeholder check runs again in every forward)
-------------------------------------------------------------------------------------------------------------
- ``llava`` / ``llava_mistral``: CLIP 12x12 px, patch 4, feature layer -2, "default" strategy (CLS dropped):
  9 tokens per image (any requested size is ignored, like the real processor which resizes), any number of
  images per sample. Inputs: input_ids, attention_mask, pixel_values (n_images_in_batch, 3, 12, 12).
  The Mistral text model has ``sliding_window=None`` (as in llava-v1.6-mistral); with the same seed the two
  variants have identical weights and logits (same architecture), only the module classes differ.
- ``llava_next``: CLIP 8x8 px tiles, patch 4 (2x2 = 4 tokens per tile), pinpoints (h, w)
  [[8, 16], [16, 8], [16, 16]], image_newline tokens included. Inputs add pixel_values
  (n_images_in_batch, max_tiles, 3, 8, 8) zero-padded over tiles, and image_sizes (n_images_in_batch, 2) = (h, w).
  Tokens per image depend on its size: (8,16) -> 14, (16,16) -> 24, (16,8) -> 16, (10,16) -> 14 (this one goes
  through ``unpad_image``).
- ``llava_onevision``: SigLIP 12x12 px tiles, patch 4 (3x3 = 9 tokens per tile), Qwen2 text model, pinpoints
  [[12,12],[12,24],[24,12],[24,24]], "anyres_max_9". A sample with exactly one image gets anyres tiling
  ((12,12) -> 21, (12,24) -> 30, (24,12) -> 33, (24,24) -> 51 tokens); a sample with several images gets the
  base tile + newline only (10 tokens each). That choice is driven by ``batch_num_images`` (one count per
  sample, included in the inputs). Videos: pixel_values_videos (n_videos_in_batch, frames, 3, 12, 12); each
  frame's 3x3 grid is pooled to 2x2, plus one newline per video: frames * 4 + 1 tokens ((2,12,12) -> 9). All
  videos of a batch must have the same frame count (the tensor is stacked), so the default video size list has
  one entry.
- ``qwen2_vl`` / ``qwen2_5_vl``: patch 4, temporal patch 2, spatial merge 2: tokens = t * (h/8) * (w/8), with
  t = 1 for images ((16,16) -> 4, (16,24) / (24,16) -> 6, (24,24) -> 9) and t = frames / 2 for videos
  ((4,16,16) -> 8, (2,16,24) -> 6). Each visual item is wrapped as VISION_START, n x IMAGE/VIDEO, VISION_END (the
  start/end tokens are text, not visual). Inputs: input_ids, attention_mask, mm_token_type_ids (0 text, 1 image,
  2 video; always included), pixel_values (sum of t*h*w/16 patch rows, 3*2*4*4 = 96) + image_grid_thw
  (n_images, 3), and likewise pixel_values_videos + video_grid_thw (+ second_per_grid_ts, all 1.0, for
  qwen2_5_vl). M-RoPE sections [2, 3, 3] (head_dim 16). Qwen2.5-VL vision: window_size 16 px, full attention
  in block 1 (block 0 windowed).
  ``get_rope_index`` drops the pads (via attention_mask) before numbering, so a padded sample gets exactly the
  positions it gets alone, on either padding side.
  State: ``model.model.rope_deltas`` is set by every multimodal forward and by ``generate``. A forward with
  ``input_ids`` and an empty cache recomputes positions and ignores it (so batch runs, single runs and
  generate calls can follow one another in any order without a reset: checked). It IS used by a forward that
  passes a non-empty ``cache`` (or only ``inputs_embeds``) without ``position_ids``. In that case, in
  transformers 5.24, passing ``attention_mask`` too makes ``compute_3d_position_ids`` build positions over the
  whole mask length (past + new) and the decode step crashes with a shape error; a manual cached decode must
  pass ``position_ids`` (3, B, new) = text position + ``rope_deltas`` or leave out attention_mask
  (``generate`` passes position_ids itself and is fine). ``reset_state(model)`` sets rope_deltas to None.
- ``llama`` / ``mistral`` / ``qwen2``: bare ``*ForCausalLM``. Inputs are input_ids + attention_mask only; the
  "visual" blocks are ordinary random token ids; ``visual_mask`` is the ground truth to hand to the library.
  ``mistral`` has ``sliding_window=None`` unless ``text_overrides={"sliding_window": 8}`` (checked: parity
  and generate hold with it too; for ``qwen2`` use ``{"use_sliding_window": True, "sliding_window": 8,
  "max_window_layers": 2}``, which makes layers 2-3 sliding).

Padding: forward works with left or right padding for every family. ``generate`` works with both but should be
given left padding (the usual decoder-only rule; with right padding new tokens are appended after the pads and
transformers warns). Batch-vs-alone parity (fp32 logits at the non-pad columns) holds for every family, both
padding sides and both attention implementations: max difference about 2e-7 with the default init (logits up
to ~0.7); ``generate`` (greedy, 3 tokens, left padding) gives the same tokens in the batch as alone. Families
that compute positions as ``arange`` (all but the Qwen2-VL ones) give left-padded samples positions shifted by
the pad count; RoPE is relative, so that only moves logits by float rounding. With ``init_std=0.2`` logits
reach ~6 and the batch-vs-alone noise reaches ~1.5e-5 on EITHER padding side (measured on this CPU, seeds 0 and
3: left up to 1.5e-5, right up to 1.4e-5 (qwen2_vl eager), 9e-6 with sdpa), because matmuls and the vision
tower run on other shapes in a batch than alone: compare with atol ~5e-5..1e-4 there, not 1e-5.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "FAMILIES",
    "MULTIMODAL_FAMILIES",
    "TEXT_ONLY_FAMILIES",
    "VIDEO_FAMILIES",
    "MODEL_TYPES",
    "PAD_ID",
    "BOS_ID",
    "EOS_ID",
    "IMAGE_TOKEN_ID",
    "VIDEO_TOKEN_ID",
    "VISION_START_ID",
    "VISION_END_ID",
    "TinyInputs",
    "build_model",
    "build_inputs",
    "single_sample_inputs",
    "default_layouts",
    "reset_state",
]

FAMILIES: list[str] = [
    "llava",
    "llava_mistral",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "llama",
    "mistral",
    "qwen2",
]
TEXT_ONLY_FAMILIES: list[str] = ["llama", "mistral", "qwen2"]
MULTIMODAL_FAMILIES: list[str] = [f for f in FAMILIES if f not in TEXT_ONLY_FAMILIES]
VIDEO_FAMILIES: list[str] = ["llava_onevision", "qwen2_vl", "qwen2_5_vl"]
MODEL_TYPES: dict[str, str] = {f: f for f in FAMILIES}
MODEL_TYPES["llava_mistral"] = "llava"

VOCAB_SIZE = 200
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TEXT_ID_RANGE = (3, 180)
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 190, 191
VISION_START_ID, VISION_END_ID = 192, 193

_TEXT = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    tie_word_embeddings=False,
)
_VISION_HIDDEN = 32

# Default visual item sizes per family (cycled); see the module docstring for the token counts they give.
_IMAGE_SIZES: dict[str, list] = {
    "llava": [(12, 12)],
    "llava_mistral": [(12, 12)],
    "llava_next": [(8, 16), (16, 16), (16, 8), (10, 16)],
    "llava_onevision": [(12, 24), (12, 12), (24, 12), (24, 24)],
    "qwen2_vl": [(16, 16), (16, 24), (24, 24), (24, 16)],
    "qwen2_5_vl": [(16, 24), (16, 16), (24, 16), (24, 24)],
    "llama": [6, 4, 5],
    "mistral": [6, 4, 5],
    "qwen2": [6, 4, 5],
}
_VIDEO_SIZES: dict[str, list] = {
    "llava_onevision": [(2, 12, 12)],
    "qwen2_vl": [(4, 16, 16), (2, 16, 24)],
    "qwen2_5_vl": [(4, 16, 16), (2, 24, 16)],
    "llama": [7, 3],
    "mistral": [7, 3],
    "qwen2": [7, 3],
}


# --------------------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------------------
def _text_config(kind: str, extra: dict):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind]
    kwargs = dict(_TEXT)
    if kind == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(extra)
    return cls(**kwargs)


def _clip_vision_config(image_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=_VISION_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=4,
        projection_dim=_VISION_HIDDEN,
    )


def _qwen_vl_text(model_type: str, extra: dict) -> dict:
    kwargs = dict(_TEXT, rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))
    kwargs.update(extra)
    return dict(model_type=model_type, **kwargs)


def _make_config(family: str, text_extra: dict):
    import transformers as tf

    if family in ("llava", "llava_mistral"):
        return tf.LlavaConfig(
            vision_config=_clip_vision_config(12),
            text_config=_text_config("mistral" if family == "llava_mistral" else "llama", text_extra),
            image_token_index=IMAGE_TOKEN_ID,
            image_seq_length=9,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            pad_token_id=PAD_ID,
        )
    if family == "llava_next":
        return tf.LlavaNextConfig(
            vision_config=_clip_vision_config(8),
            text_config=_text_config("llama", text_extra),
            image_token_index=IMAGE_TOKEN_ID,
            image_grid_pinpoints=[[8, 16], [16, 8], [16, 16]],
            image_seq_length=4,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            pad_token_id=PAD_ID,
        )
    if family == "llava_onevision":
        return tf.LlavaOnevisionConfig(
            vision_config=tf.SiglipVisionConfig(
                hidden_size=_VISION_HIDDEN,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=12,
                patch_size=4,
                vision_use_head=False,
            ),
            text_config=_text_config("qwen2", text_extra),
            image_token_index=IMAGE_TOKEN_ID,
            video_token_index=VIDEO_TOKEN_ID,
            image_grid_pinpoints=[[12, 12], [12, 24], [24, 12], [24, 24]],
            vision_aspect_ratio="anyres_max_9",
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            pad_token_id=PAD_ID,
        )
    if family == "qwen2_vl":
        return tf.Qwen2VLConfig(
            text_config=_qwen_vl_text("qwen2_vl_text", text_extra),
            vision_config=dict(
                model_type="qwen2_vl_vision",
                depth=2,
                embed_dim=_VISION_HIDDEN,
                hidden_size=_TEXT["hidden_size"],
                num_heads=2,
                mlp_ratio=2,
                patch_size=4,
                spatial_merge_size=2,
                temporal_patch_size=2,
            ),
            image_token_id=IMAGE_TOKEN_ID,
            video_token_id=VIDEO_TOKEN_ID,
            vision_start_token_id=VISION_START_ID,
            vision_end_token_id=VISION_END_ID,
        )
    if family == "qwen2_5_vl":
        return tf.Qwen2_5_VLConfig(
            text_config=_qwen_vl_text("qwen2_5_vl_text", text_extra),
            vision_config=dict(
                model_type="qwen2_5_vl_vision",
                depth=2,
                hidden_size=_VISION_HIDDEN,
                intermediate_size=64,
                num_heads=2,
                patch_size=4,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=16,
                out_hidden_size=_TEXT["hidden_size"],
                fullatt_block_indexes=[1],
                tokens_per_second=2,
            ),
            image_token_id=IMAGE_TOKEN_ID,
            video_token_id=VIDEO_TOKEN_ID,
            vision_start_token_id=VISION_START_ID,
            vision_end_token_id=VISION_END_ID,
        )
    if family in TEXT_ONLY_FAMILIES:
        return _text_config(family, text_extra)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


_MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_mistral": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def _all_configs(config):
    yield config
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            yield from _all_configs(sub)


def build_model(
    family: str,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    init_std: float | None = None,
    text_overrides: dict | None = None,
):
    """A tiny fp32 random-weight model of ``family`` in eval mode (deterministic in ``seed``).

    ``init_std`` overrides ``initializer_range`` of every (sub)config; ``text_overrides`` are extra keyword
    arguments of the text config, e.g. ``build_model("mistral", text_overrides={"sliding_window": 8})``.
    """
    import transformers

    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
    config = _make_config(family, dict(text_overrides or {}))
    if init_std is not None:
        for cfg in _all_configs(config):
            if hasattr(cfg, "initializer_range"):
                cfg.initializer_range = init_std
    cls = getattr(transformers, _MODEL_CLASSES[family])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    assert model.config.model_type == MODEL_TYPES[family], (model.config.model_type, family)
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = PAD_ID, BOS_ID, EOS_ID
    gen.do_sample = False
    model.eval()
    return model


def reset_state(model) -> None:
    """Clear state some models cache between calls (Qwen2-VL / Qwen2.5-VL ``rope_deltas``)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None


# --------------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------------
def default_layouts(family: str, batch_size: int = 3) -> list[dict]:
    """Mixed per-sample layouts: 1 image, 2 interleaved images, text only / video; lengths all differ."""
    pool = [
        dict(n_text_before=3, images=1, n_text_after=5),
        dict(n_text_before=2, images=2, n_text_between=3, n_text_after=4),
        dict(n_text_before=6, images=1, n_text_after=2),
        dict(n_text_before=4, images=0, n_text_after=7),
    ]
    if family in VIDEO_FAMILIES or family in TEXT_ONLY_FAMILIES:
        pool[2] = dict(n_text_before=5, videos=1, n_text_after=3)
    if family in TEXT_ONLY_FAMILIES:
        pool[1]["scatter"] = True
    return [dict(pool[i % len(pool)]) for i in range(batch_size)]


_LAYOUT_KEYS = {
    "n_text_before",
    "images",
    "videos",
    "n_text_between",
    "n_text_after",
    "image_sizes",
    "video_sizes",
    "scatter",
    "seed",
    "segments",
}


def _resolve_layout(family: str, layout: dict, default_seed: int) -> dict:
    unknown = set(layout) - _LAYOUT_KEYS
    if unknown:
        raise ValueError(f"unknown layout keys {sorted(unknown)}; allowed: {sorted(_LAYOUT_KEYS)}")
    out = dict(layout)
    s = int(out.get("seed", default_seed))
    out["seed"] = s
    if out.get("segments") is None:
        n_img, n_vid = int(out.get("images", 0)), int(out.get("videos", 0))
        if n_vid and family not in VIDEO_FAMILIES and family not in TEXT_ONLY_FAMILIES:
            raise ValueError(f"family {family!r} has no video input")
        img_sizes = list(out.get("image_sizes") or [])
        vid_sizes = list(out.get("video_sizes") or [])
        img_pool, vid_pool = _IMAGE_SIZES[family], _VIDEO_SIZES.get(family, [None])
        while len(img_sizes) < n_img:
            img_sizes.append(img_pool[(s + len(img_sizes)) % len(img_pool)])
        while len(vid_sizes) < n_vid:
            vid_sizes.append(vid_pool[(s + len(vid_sizes)) % len(vid_pool)])
        visual = [("image", _tuple_or_int(z)) for z in img_sizes[:n_img]]
        visual += [("video", _tuple_or_int(z)) for z in vid_sizes[:n_vid]]
        segments: list = []
        if out.get("n_text_before", 3):
            segments.append(("text", int(out.get("n_text_before", 3))))
        for j, item in enumerate(visual):
            if j and out.get("n_text_between", 2):
                segments.append(("text", int(out.get("n_text_between", 2))))
            segments.append(item)
        if out.get("n_text_after", 4):
            segments.append(("text", int(out.get("n_text_after", 4))))
        out["segments"] = segments
    else:
        out["segments"] = [(k, _tuple_or_int(v)) for k, v in out["segments"]]
    for kind, _ in out["segments"]:
        if kind not in ("text", "image", "video"):
            raise ValueError(f"bad segment kind {kind!r}")
        if kind == "video" and family not in VIDEO_FAMILIES and family not in TEXT_ONLY_FAMILIES:
            raise ValueError(f"family {family!r} has no video input")
    if not any(n for k, n in out["segments"] if k == "text") and not any(k != "text" for k, _ in out["segments"]):
        raise ValueError("empty sample")
    return out


def _tuple_or_int(v):
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v)
    return int(v)


class TinyInputs(dict):
    """``dict`` of model inputs plus ground-truth attributes (see the module docstring)."""

    model: Any
    family: str
    layouts: list[dict]
    padding_side: str
    visual_mask: torch.Tensor
    image_mask: torch.Tensor
    video_mask: torch.Tensor
    lengths: list[int]
    visual_items: list[list[tuple]]

    def positions(self, i: int) -> torch.Tensor:
        return torch.nonzero(self["attention_mask"][i].bool()).squeeze(-1)

    def sample(self, i: int) -> "TinyInputs":
        return build_inputs(self.model, self.family, batch_layouts=[self.layouts[i]], padding_side=self.padding_side)

    def to(self, device) -> "TinyInputs":
        out = TinyInputs({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in dict.items(self)})
        out.__dict__.update(self.__dict__)
        for name in ("visual_mask", "image_mask", "video_mask"):
            setattr(out, name, getattr(self, name).to(device))
        return out

    def __repr__(self):
        keys = {k: (tuple(v.shape) if torch.is_tensor(v) else v) for k, v in dict.items(self)}
        return f"TinyInputs(family={self.family!r}, padding_side={self.padding_side!r}, {keys})"


def single_sample_inputs(inputs: TinyInputs, i: int) -> TinyInputs:
    """Sample ``i`` of ``inputs`` rebuilt alone (batch 1, unpadded)."""
    return inputs.sample(i)


# ---- per-family pixels and token counts ----------------------------------------------------------------------
def _qwen_grid(model, kind: str, size: tuple) -> tuple[int, int, int]:
    vc = model.config.vision_config
    p, tp, merge = vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size
    if kind == "image":
        (h, w), t = size, 1
    else:
        frames, h, w = size
        if frames % tp:
            raise ValueError(f"video frames must be a multiple of temporal_patch_size={tp}, got {frames}")
        t = frames // tp
    if h % (p * merge) or w % (p * merge):
        raise ValueError(f"qwen image sides must be multiples of {p * merge} px, got {(h, w)}")
    return t, h // p, w // p


def _make_pixels(model, family: str, kind: str, size, gen: torch.Generator) -> dict:
    """Random pixel tensor(s) for one visual item, in the per-item shape the processor would give."""
    vc = getattr(model.config, "vision_config", None)
    if family in ("llava", "llava_mistral"):
        s = vc.image_size
        return dict(pixel=torch.randn(3, s, s, generator=gen), size=(s, s))
    if family in ("llava_next", "llava_onevision"):
        s = vc.image_size
        if kind == "video":
            frames, h, w = size
            if (h, w) != (s, s):
                raise ValueError(f"{family} video frames must be {s}x{s}")
            return dict(pixel=torch.randn(frames, 3, s, s, generator=gen), size=size)
        # all tiles drawn now; llava_onevision drops to the base tile when the sample has several images
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        n_tiles = image_size_to_num_patches(list(size), model.config.image_grid_pinpoints, s)
        return dict(pixel=torch.randn(n_tiles, 3, s, s, generator=gen), size=size)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        t, gh, gw = _qwen_grid(model, kind, size)
        dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        return dict(pixel=torch.randn(t * gh * gw, dim, generator=gen), grid=(t, gh, gw), size=size)
    raise AssertionError(family)


@torch.no_grad()
def _count_tokens(model, family: str, kinds: list[str], pix: list[dict]) -> list[int]:
    """Visual tokens of each item of ONE sample, from the model's own vision code (checked vs closed forms)."""
    if not pix:
        return []
    dev = next(model.parameters()).device
    base = model.model
    counts: list[int | None] = [None] * len(pix)
    img = [j for j, k in enumerate(kinds) if k == "image"]
    vid = [j for j, k in enumerate(kinds) if k == "video"]
    if family in ("llava", "llava_mistral"):
        pv = torch.stack([pix[j]["pixel"] for j in img]).to(dev)
        feats = base.get_image_features(pixel_values=pv, return_dict=True).pooler_output
        vc = model.config.vision_config
        expected = (vc.image_size // vc.patch_size) ** 2
        for j, f in zip(img, feats):
            assert f.shape[0] == expected, (f.shape, expected)
            counts[j] = f.shape[0]
    elif family in ("llava_next", "llava_onevision"):
        if img:
            pv, sizes = _stack_tiles([pix[j] for j in img], family, [len(img)])
            kw = dict(batch_num_images=torch.tensor([len(img)])) if family == "llava_onevision" else {}
            feats = base.get_image_features(pv.to(dev), sizes.to(dev), return_dict=True, **kw).pooler_output
            for j, f in zip(img, feats):
                counts[j] = f.shape[0]
        if vid:
            pvv = torch.stack([pix[j]["pixel"] for j in vid]).to(dev)
            feats = base.get_video_features(pvv, return_dict=True).pooler_output
            vc = model.config.vision_config
            side = -(-(vc.image_size // vc.patch_size) // 2)
            for j, f in zip(vid, feats):
                assert f.shape[0] == pix[j]["size"][0] * side * side + 1, (f.shape, pix[j]["size"])
                counts[j] = f.shape[0]
    else:  # qwen2_vl / qwen2_5_vl
        merge = model.config.vision_config.spatial_merge_size
        for kind, idx in (("image", img), ("video", vid)):
            if not idx:
                continue
            pv = torch.cat([pix[j]["pixel"] for j in idx]).to(dev)
            grid = torch.tensor([pix[j]["grid"] for j in idx], device=dev)
            fn = base.get_image_features if kind == "image" else base.get_video_features
            feats = fn(pv, grid, return_dict=True).pooler_output
            for j, f in zip(idx, feats):
                t, gh, gw = pix[j]["grid"]
                assert f.shape[0] == t * gh * gw // merge**2, (f.shape, pix[j]["grid"])
                counts[j] = f.shape[0]
    return [int(c) for c in counts]


def _stack_tiles(items: list[dict], family: str, per_sample_counts: list[int]):
    """(n_images, max_tiles, 3, s, s) zero-padded + image_sizes (n_images, 2), like the LLaVA-NeXT processors."""
    tiles = []
    k = 0
    for n in per_sample_counts:
        for _ in range(n):
            t = items[k]["pixel"]
            if family == "llava_onevision" and n > 1:
                t = t[:1]  # multi-image samples: base tile only (batch_num_images > 1)
            tiles.append(t)
            k += 1
    m = max(t.shape[0] for t in tiles)
    pv = torch.zeros(len(tiles), m, *tiles[0].shape[1:])
    for i, t in enumerate(tiles):
        pv[i, : t.shape[0]] = t
    sizes = torch.tensor([list(it["size"]) for it in items], dtype=torch.long)
    return pv, sizes


def build_inputs(
    model,
    family: str,
    *,
    batch_layouts: list[dict] | None = None,
    padding_side: str = "left",
    seed: int = 0,
) -> TinyInputs:
    """Padded batch of inputs for ``model`` (see the module docstring for the layout spec)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if model.config.model_type != MODEL_TYPES[family]:
        raise ValueError(f"model is {model.config.model_type!r}, family {family!r} expects {MODEL_TYPES[family]!r}")
    if batch_layouts is None:
        batch_layouts = default_layouts(family)
    layouts = [_resolve_layout(family, lay, seed * 10007 + i) for i, lay in enumerate(batch_layouts)]
    text_only = family in TEXT_ONLY_FAMILIES
    qwen = family in ("qwen2_vl", "qwen2_5_vl")

    ids_list, type_list, items_list, pix_list = [], [], [], []
    for lay in layouts:
        gen = torch.Generator().manual_seed(lay["seed"])
        visual = [(k, z) for k, z in lay["segments"] if k != "text"]
        pix = [] if text_only else [_make_pixels(model, family, k, z, gen) for k, z in visual]
        if text_only:
            counts = [int(n) for _, n in visual]
        else:
            counts = _count_tokens(model, family, [k for k, _ in visual], pix)
        ids: list[int] = []
        mtype: list[int] = []  # 0 text, 1 image, 2 video
        j = 0
        for kind, val in lay["segments"]:
            if kind == "text":
                ids += torch.randint(*TEXT_ID_RANGE, (val,), generator=gen).tolist()
                mtype += [0] * val
                continue
            n, code = counts[j], (1 if kind == "image" else 2)
            j += 1
            if text_only:
                block = torch.randint(*TEXT_ID_RANGE, (2 * n - 1 if lay.get("scatter") else n,), generator=gen)
                ids += block.tolist()
                mtype += [code if (not lay.get("scatter") or q % 2 == 0) else 0 for q in range(len(block))]
                continue
            tok = IMAGE_TOKEN_ID if kind == "image" else VIDEO_TOKEN_ID
            if qwen:
                ids += [VISION_START_ID] + [tok] * n + [VISION_END_ID]
                mtype += [0] + [code] * n + [0]
            else:
                ids += [tok] * n
                mtype += [code] * n
        ids_list.append(ids)
        type_list.append(mtype)
        items_list.append([(k, z, c) for (k, z), c in zip(visual, counts)])
        pix_list.append(pix)

    B, L = len(ids_list), max(len(x) for x in ids_list)
    input_ids = torch.full((B, L), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    mm_types = torch.zeros(B, L, dtype=torch.long)
    for b, (ids, mt) in enumerate(zip(ids_list, type_list)):
        sl = slice(L - len(ids), L) if padding_side == "left" else slice(0, len(ids))
        input_ids[b, sl] = torch.tensor(ids)
        attention_mask[b, sl] = 1
        mm_types[b, sl] = torch.tensor(mt)

    out = TinyInputs(input_ids=input_ids, attention_mask=attention_mask)
    flat = [] if text_only else [(k, pix[j]) for its, pix in zip(items_list, pix_list) for j, (k, _, _) in enumerate(its)]
    img_items = [p for k, p in flat if k == "image"]
    vid_items = [p for k, p in flat if k == "video"]
    n_img_per_sample = [sum(1 for k, _, _ in its if k == "image") for its in items_list]
    if not text_only:
        if family in ("llava", "llava_mistral"):
            if img_items:
                out["pixel_values"] = torch.stack([it["pixel"] for it in img_items])
        elif family in ("llava_next", "llava_onevision"):
            if img_items:
                pv, sizes = _stack_tiles(img_items, family, [n for n in n_img_per_sample if n])
                out["pixel_values"], out["image_sizes"] = pv, sizes
                if family == "llava_onevision":
                    out["batch_num_images"] = torch.tensor(n_img_per_sample, dtype=torch.long)
            if vid_items:
                frames = {it["pixel"].shape[0] for it in vid_items}
                if len(frames) != 1:
                    raise ValueError(f"llava_onevision videos in one batch need the same frame count, got {frames}")
                out["pixel_values_videos"] = torch.stack([it["pixel"] for it in vid_items])
        elif qwen:
            if img_items:
                out["pixel_values"] = torch.cat([it["pixel"] for it in img_items])
                out["image_grid_thw"] = torch.tensor([it["grid"] for it in img_items], dtype=torch.long)
            if vid_items:
                out["pixel_values_videos"] = torch.cat([it["pixel"] for it in vid_items])
                out["video_grid_thw"] = torch.tensor([it["grid"] for it in vid_items], dtype=torch.long)
                if family == "qwen2_5_vl":
                    out["second_per_grid_ts"] = torch.ones(len(vid_items))
    if qwen:
        out["mm_token_type_ids"] = mm_types.clone()

    out.model = model
    out.family = family
    out.layouts = layouts
    out.padding_side = padding_side
    out.image_mask = mm_types == 1
    out.video_mask = mm_types == 2
    out.visual_mask = out.image_mask | out.video_mask
    out.lengths = [len(x) for x in ids_list]
    out.visual_items = items_list
    if not text_only:  # the placeholder count must equal the number of features the model will scatter
        n_img = sum(c for its in items_list for k, _, c in its if k == "image")
        n_vid = sum(c for its in items_list for k, _, c in its if k == "video")
        assert int((input_ids == IMAGE_TOKEN_ID).sum()) == n_img == int(out.image_mask.sum())
        assert int((input_ids == VIDEO_TOKEN_ID).sum()) == n_vid == int(out.video_mask.sum())
    dev = next(model.parameters()).device
    return out.to(dev) if dev.type != "cpu" else out
