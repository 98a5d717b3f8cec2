"""Families fed each image as a sequence of patches with their (x, y) grid positions: Gemma 4.

Vision: patch 4 px, pooling kernel 2 (2 x 2 patches per soft token): an (h, w) image gives (h/8) * (w/8) tokens,
(16, 16) -> 4, (16, 24) / (24, 16) -> 6. Each image is ``<boi>`` (VISION_START_ID), its tokens, ``<eoi>``
(VISION_END_ID), as the processor writes it. Inputs: pixel_values (n_images, max_patches, 48) and
image_position_ids (n_images, max_patches, 2), padded with -1 positions; mm_token_type_ids (1 at image tokens),
which turns on the bidirectional attention between the tokens of one image in sliding layers.

Text model (``gemma4_text``), 4 layers [sliding, global, sliding, global], sliding window 4 (shorter than an
image); global layers with head_dim 32, one KV head and keys as values (no v_proj); the last layer (global) reuses
the keys/values that layer 1 stores (``text_overrides={"num_kv_shared_layers": 2}``: layers 2 and 3 reuse those of
layers 0 and 1); an MoE branch (4 experts, top 2) beside every MLP; per-layer inputs of 16 dims; a layer_scalar per layer
(set to 0.5, 0.75, 1.25, 1.5, since 1.0 would hide whether it is applied); a double-wide MLP in the KV-sharing layer;
final logit soft-capping 30. No audio tower and no video.
"""

from __future__ import annotations

import torch

from .base import IMAGE, IMAGE_TOKEN_ID, TEXT_DIMS, VIDEO_TOKEN_ID, VISION_END_ID, VISION_START_ID, FamilySpec, wrapped

_PATCH, _POOL = 4, 2
LAYER_SCALARS = (0.5, 0.75, 1.25, 1.5)


class Gemma4(FamilySpec):
    name = model_type = "gemma4"
    model_class = "Gemma4ForConditionalGeneration"
    image_sizes = [(16, 16), (16, 24), (24, 16)]

    def make_config(self, text_extra):
        import transformers as tf

        text = dict(TEXT_DIMS, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
                    layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=4,
                    num_kv_shared_layers=1, use_double_wide_mlp=True, enable_moe_block=True, num_experts=4,
                    top_k_experts=2, moe_intermediate_size=32, hidden_size_per_layer_input=16,
                    vocab_size_per_layer_input=TEXT_DIMS["vocab_size"], use_bidirectional_attention="vision",
                    final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh")
        text.update(text_extra)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=16, patch_size=_PATCH, pooling_kernel_size=_POOL,
                      position_embedding_size=80)
        return tf.Gemma4Config(text_config=tf.Gemma4TextConfig(**text), vision_config=vision, audio_config=None,
                               image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID,
                               boi_token_id=VISION_START_ID, eoi_token_id=VISION_END_ID, audio_token_id=197)

    def finalize(self, model) -> None:
        for layer, value in zip(model.model.language_model.layers, LAYER_SCALARS):
            layer.layer_scalar.fill_(value)

    def make_item(self, model, kind, size, gen):
        h, w = size
        rows, cols = h // _PATCH, w // _PATCH
        y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        positions = torch.stack([x.flatten(), y.flatten()], dim=-1)
        return dict(pixel=torch.rand(rows * cols, 3 * _PATCH**2, generator=gen), positions=positions, size=size)

    def _pad(self, items):
        most = max(it["pixel"].shape[0] for it in items)
        pixels = torch.zeros(len(items), most, items[0]["pixel"].shape[1])
        positions = torch.full((len(items), most, 2), -1, dtype=torch.long)
        for i, it in enumerate(items):
            pixels[i, : it["pixel"].shape[0]] = it["pixel"]
            positions[i, : it["pixel"].shape[0]] = it["positions"]
        return {"pixel_values": pixels, "image_position_ids": positions}

    def count_tokens(self, model, kinds, items):
        if not items:
            return []
        inputs = {key: value.to(model.device) for key, value in self._pad(items).items()}
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"], return_dict=True)
        counts = [f.shape[0] for f in feats.pooler_output]
        assert counts == [it["size"][0] * it["size"][1] // (_PATCH * _POOL) ** 2 for it in items], counts
        return counts

    def placeholder(self, kind, n, item):
        return wrapped([IMAGE_TOKEN_ID] * n, [IMAGE] * n)

    def collate(self, samples):
        items = [item for pairs in samples for _, item in pairs]
        return self._pad(items) if items else {}

    def extra_inputs(self, mm_types, attention_mask):
        return {"mm_token_type_ids": mm_types.clone()}


SPECS = [Gemma4()]
