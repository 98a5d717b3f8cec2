"""Families fed flattened patch grids (``pixel_values`` rows + ``*_grid_thw``) with 3-D multimodal RoPE:
Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense and MoE) and GLM-4.1V.

Patch 4, temporal patch 2, spatial merge 2: an item of grid (t, h/4, w/4) gives t * (h/8) * (w/8) tokens, with
t = 1 for images ((16,16) -> 4, (16,24) / (24,16) -> 6, (24,24) -> 9) and t = frames / 2 for videos ((4,16,16) ->
8, (2,16,24) -> 6). Inputs: input_ids, attention_mask, mm_token_type_ids (0 text, 1 image, 2 video; always
included), pixel_values (sum of t*h*w/16 rows of 3*2*4*4 = 96) + image_grid_thw (n_images, 3), likewise
pixel_values_videos + video_grid_thw (+ second_per_grid_ts, all 1.0, for Qwen2.5-VL).

- Qwen2-VL / Qwen2.5-VL: each item is VISION_START, n x IMAGE/VIDEO, VISION_END. M-RoPE sections [2, 3, 3].
  Qwen2.5-VL vision: window_size 16 px, full attention in block 1 (block 0 windowed).
- Qwen3-VL (``qwen3_vl``, ``qwen3_vl_moe``): QK-norm text model, interleaved M-RoPE [2, 3, 3]; vision depth 3 with
  ``deepstack_visual_indexes=[0, 1, 2]``, so DeepStack adds vision features after decoder layers 0, 1 and 2. A video
  is one VISION_START, tokens, VISION_END group per temporal step, each after a timestamp text token, as the
  processor writes it (``get_rope_index`` numbers each step as its own grid). MoE: 4 experts, top 2, MoE in layers
  0-2 and a dense MLP in layer 3.
- Qwen3.5 / 3.6 (``qwen3_5``, ``qwen3_5_moe``): hybrid text model, layer types [linear, full, linear, full] (so
  layers 1 and 2 are one of each kind), Gated DeltaNet with 2 key / 4 value heads of 8 dims and a 4-tap convolution;
  full-attention layers with QK-norm, output gate, head_dim 32 and partial (half) interleaved M-RoPE [2, 3, 3].
  Vision as Qwen3-VL without DeepStack; videos as Qwen3-VL. MoE: 4 experts, top 2, a shared expert, in every layer.
- GLM-4.1V: sandwich-norm text model, partial (half) RoPE on interleaved pairs, M-RoPE [1, 1, 2]. Images are
  VISION_START, n x IMAGE, VISION_END; a video is VIDEO_START, then per temporal step VISION_START, IMAGE tokens,
  VISION_END and a timestamp text token, then VIDEO_END: video features use the *image* token id (modality code 2
  in mm_token_type_ids). In transformers 5.24 a batch cannot hold both images and videos (the model fills video
  features into every image token), so the default batches have no video.

``get_rope_index`` drops the pads (via attention_mask) before numbering, so a padded sample gets exactly the
positions it gets alone. State: ``model.model.rope_deltas`` is set by every multimodal forward and by ``generate``;
a forward with ``input_ids`` and an empty cache recomputes positions and ignores it. A manual cached decode must
pass ``position_ids`` (``generate`` does). ``reset_state(model)`` sets rope_deltas to None.
"""

from __future__ import annotations

import torch

from .base import (
    IMAGE,
    IMAGE_TOKEN_ID,
    TEXT,
    TEXT_DIMS,
    TEXT_ID_RANGE,
    VIDEO,
    VIDEO_END_ID,
    VIDEO_START_ID,
    VIDEO_TOKEN_ID,
    VISION_END_ID,
    VISION_HIDDEN,
    VISION_START_ID,
    FamilySpec,
    wrapped,
)

_ROPE = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])
_TOKENS = dict(image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID)
_GRID = dict(patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[3])
#: Qwen3.5's text model: one layer type per decoder layer, so layers 1 and 2 (the usual frozen pair) are one of each.
HYBRID_LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
_HYBRID = dict(head_dim=32, layer_types=HYBRID_LAYER_TYPES, linear_num_key_heads=2, linear_num_value_heads=4,
               linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4,
               rope_parameters=dict(_ROPE, mrope_interleaved=True, partial_rotary_factor=0.5))


class PatchGrid(FamilySpec):
    image_sizes = [(16, 16), (16, 24), (24, 24), (24, 16)]
    video_sizes = [(4, 16, 16), (2, 16, 24)]

    def __init__(self, name: str, model_class: str, image_sizes=None, video_sizes=None):
        self.name = self.model_type = name
        self.model_class = model_class
        self.image_sizes = image_sizes or self.image_sizes
        self.video_sizes = video_sizes or self.video_sizes
        self.mixes_images_and_videos = name != "glm4v"

    def make_config(self, text_extra):
        import transformers as tf

        text = dict(TEXT_DIMS, rope_parameters=dict(_ROPE))
        if self.name == "qwen2_vl":
            vision = dict(model_type="qwen2_vl_vision", depth=2, embed_dim=VISION_HIDDEN, num_heads=2, mlp_ratio=2,
                          hidden_size=TEXT_DIMS["hidden_size"], **_GRID)
            config = tf.Qwen2VLConfig
        elif self.name == "qwen2_5_vl":
            vision = dict(model_type="qwen2_5_vl_vision", depth=2, hidden_size=VISION_HIDDEN, intermediate_size=64,
                          num_heads=2, window_size=16, out_hidden_size=TEXT_DIMS["hidden_size"],
                          fullatt_block_indexes=[1], tokens_per_second=2, **_GRID)
            config = tf.Qwen2_5_VLConfig
        elif self.name.startswith("qwen3_5"):
            vision = dict(depth=2, hidden_size=VISION_HIDDEN, intermediate_size=64, num_heads=2,
                          out_hidden_size=TEXT_DIMS["hidden_size"], num_position_embeddings=16, **_GRID)
            text.update(_HYBRID)
            if self.name == "qwen3_5_moe":
                text.pop("intermediate_size")
                text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                            shared_expert_intermediate_size=32)
            config = tf.Qwen3_5MoeConfig if self.name == "qwen3_5_moe" else tf.Qwen3_5Config
        elif self.name.startswith("qwen3_vl"):
            vision = dict(depth=3, hidden_size=VISION_HIDDEN, intermediate_size=64, num_heads=2,
                          out_hidden_size=TEXT_DIMS["hidden_size"], num_position_embeddings=16,
                          deepstack_visual_indexes=[0, 1, 2], **_GRID)
            text.update(head_dim=16, rope_parameters=dict(_ROPE, mrope_interleaved=True))
            if self.name == "qwen3_vl_moe":
                text.update(_MOE)
            config = tf.Qwen3VLMoeConfig if self.name == "qwen3_vl_moe" else tf.Qwen3VLConfig
        else:  # glm4v
            vision = dict(depth=2, hidden_size=VISION_HIDDEN, intermediate_size=64, num_heads=2, image_size=16,
                          out_hidden_size=TEXT_DIMS["hidden_size"], **_GRID)
            text["rope_parameters"] = dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2],
                                           partial_rotary_factor=0.5)
            text.update(text_extra)
            return tf.Glm4vConfig(text_config=dict(text, model_type="glm4v_text"), vision_config=vision, **_TOKENS,
                                  image_start_token_id=VISION_START_ID, image_end_token_id=VISION_END_ID,
                                  video_start_token_id=VIDEO_START_ID, video_end_token_id=VIDEO_END_ID)
        text.update(text_extra)
        return config(text_config=dict(text, model_type=f"{self.name}_text"), vision_config=vision, **_TOKENS,
                      vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID)

    def make_item(self, model, kind, size, gen):
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
            raise ValueError(f"image sides must be multiples of {p * merge} px, got {(h, w)}")
        dim = vc.in_channels * tp * p**2
        return dict(pixel=torch.randn(t * (h // p) * (w // p), dim, generator=gen), grid=(t, h // p, w // p),
                    size=size)

    def count_tokens(self, model, kinds, items):
        counts: list = [None] * len(items)
        merge = model.config.vision_config.spatial_merge_size
        for kind in ("image", "video"):
            idx = [j for j, k in enumerate(kinds) if k == kind]
            if not idx:
                continue
            pv = torch.cat([items[j]["pixel"] for j in idx]).to(model.device)
            grid = torch.tensor([items[j]["grid"] for j in idx], device=model.device)
            fn = model.model.get_image_features if kind == "image" else model.model.get_video_features
            for j, f in zip(idx, fn(pv, grid, return_dict=True).pooler_output):
                t, gh, gw = items[j]["grid"]
                assert f.shape[0] == t * gh * gw // merge**2, (f.shape, items[j]["grid"])
                counts[j] = f.shape[0]
        return [int(c) for c in counts]

    def placeholder(self, kind, n, item):
        if kind == "image" or self.name in ("qwen2_vl", "qwen2_5_vl"):
            token = IMAGE_TOKEN_ID if kind == "image" else VIDEO_TOKEN_ID
            return wrapped([token] * n, [IMAGE if kind == "image" else VIDEO] * n)
        steps = item["grid"][0]
        ids, codes = [], []
        for step in range(steps):  # one group per temporal step, with its timestamp (a text token)
            timestamp = TEXT_ID_RANGE[0] + step
            if self.name == "glm4v":
                group = wrapped([IMAGE_TOKEN_ID] * (n // steps), [VIDEO] * (n // steps))
                ids, codes = ids + group[0] + [timestamp], codes + group[1] + [TEXT]
            else:
                group = wrapped([VIDEO_TOKEN_ID] * (n // steps), [VIDEO] * (n // steps))
                ids, codes = ids + [timestamp] + group[0], codes + [TEXT] + group[1]
        if self.name == "glm4v":
            return wrapped(ids, codes, VIDEO_START_ID, VIDEO_END_ID)
        return ids, codes

    def collate(self, samples):
        out = {}
        for kind, values, grid in (("image", "pixel_values", "image_grid_thw"),
                                   ("video", "pixel_values_videos", "video_grid_thw")):
            items = [item for pairs in samples for k, item in pairs if k == kind]
            if items:
                out[values] = torch.cat([it["pixel"] for it in items])
                out[grid] = torch.tensor([it["grid"] for it in items], dtype=torch.long)
                if kind == "video" and self.name == "qwen2_5_vl":
                    out["second_per_grid_ts"] = torch.ones(len(items))
        return out

    def extra_inputs(self, mm_types, attention_mask):
        return {"mm_token_type_ids": mm_types.clone()}


SPECS = [
    PatchGrid("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    PatchGrid("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", image_sizes=[(16, 24), (16, 16), (24, 16), (24, 24)],
              video_sizes=[(4, 16, 16), (2, 24, 16)]),
    PatchGrid("qwen3_vl", "Qwen3VLForConditionalGeneration"),
    PatchGrid("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration"),
    PatchGrid("glm4v", "Glm4vForConditionalGeneration"),
    PatchGrid("qwen3_5", "Qwen3_5ForConditionalGeneration"),
    PatchGrid("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration"),
]
