"""Families fed one pixel tensor per image or tile: LLaVA 1.5 / NeXT / OneVision, InternVL, SmolVLM, Idefics3,
Mistral 3 and Gemma 3. Token counts come from the model's own vision code (checked against the closed forms)."""

from __future__ import annotations

import torch

from .base import (
    IMAGE,
    IMAGE_TOKEN_ID,
    PAD_ID,
    ROW_BREAK_ID,
    TEXT,
    VIDEO_TOKEN_ID,
    VISION_END_ID,
    VISION_HIDDEN,
    VISION_START_ID,
    FamilySpec,
    text_config,
    wrapped,
)

_SMALL_VISION = dict(hidden_size=VISION_HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def _clip_vision_config(image_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**_SMALL_VISION, image_size=image_size, patch_size=4, projection_dim=VISION_HIDDEN)


class OneTensorPerImage(FamilySpec):
    """Every image is resized to the vision tower's square size and gives a fixed number of tokens."""

    def tokens_per_image(self, model) -> int:
        raise NotImplementedError

    def make_item(self, model, kind, size, gen):
        s = model.config.vision_config.image_size
        return dict(pixel=torch.randn(3, s, s, generator=gen), size=(s, s))

    def count_tokens(self, model, kinds, items):
        if not items:
            return []
        pv = torch.stack([it["pixel"] for it in items]).to(model.device)
        feats = model.model.get_image_features(pixel_values=pv, return_dict=True).pooler_output
        assert all(f.shape[0] == self.tokens_per_image(model) for f in feats)
        return [f.shape[0] for f in feats]

    def collate(self, samples):
        images = [item["pixel"] for pairs in samples for _, item in pairs]
        return {"pixel_values": torch.stack(images)} if images else {}


class Llava(OneTensorPerImage):
    """CLIP 12x12 px, patch 4, feature layer -2, "default" strategy (CLS dropped): 9 tokens per image (any requested
    size is ignored, like the real processor which resizes), any number of images per sample. Inputs:
    pixel_values (n_images_in_batch, 3, 12, 12). ``llava_mistral`` has a Mistral text model with
    ``sliding_window=None`` (as in llava-v1.6-mistral); with the same seed both variants have identical weights."""

    model_type, model_class = "llava", "LlavaForConditionalGeneration"
    image_sizes = [(12, 12)]

    def __init__(self, name: str = "llava", text: str = "llama"):
        self.name, self.text = name, text

    def make_config(self, text_extra):
        import transformers as tf

        return tf.LlavaConfig(
            vision_config=_clip_vision_config(12), text_config=text_config(self.text, text_extra),
            image_token_index=IMAGE_TOKEN_ID, image_seq_length=9, vision_feature_layer=-2,
            vision_feature_select_strategy="default", pad_token_id=PAD_ID,
        )

    def tokens_per_image(self, model):
        vc = model.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2


class LlavaNext(FamilySpec):
    """CLIP 8x8 px tiles, patch 4 (4 tokens per tile), pinpoints (h, w) [[8, 16], [16, 8], [16, 16]],
    image_newline tokens included. Inputs: pixel_values (n_images, max_tiles, 3, 8, 8) zero-padded over tiles and
    image_sizes (n_images, 2). Tokens: (8,16) -> 14, (16,16) -> 24, (16,8) -> 16, (10,16) -> 14 (``unpad_image``).

    ``llava_onevision``: SigLIP 12x12 px tiles (9 tokens), Qwen2 text model, pinpoints [[12,12],[12,24],[24,12],
    [24,24]], "anyres_max_9". A sample with one image gets anyres tiling ((12,12) -> 21, (12,24) -> 30, (24,12) ->
    33, (24,24) -> 51 tokens); with several images, the base tile + newline only (10 tokens each), as chosen by
    ``batch_num_images`` (one count per sample, in the inputs). Videos: pixel_values_videos (n_videos, frames, 3,
    12, 12); each frame's 3x3 grid pooled to 2x2, plus one newline: frames * 4 + 1 tokens ((2,12,12) -> 9). All
    videos of a batch need the same frame count (the tensor is stacked)."""

    def __init__(self, name: str):
        self.name = self.model_type = name
        self.model_class = "LlavaNextForConditionalGeneration" if name == "llava_next" else \
            "LlavaOnevisionForConditionalGeneration"
        self.onevision = name == "llava_onevision"
        self.image_sizes = [(12, 24), (12, 12), (24, 12), (24, 24)] if self.onevision else \
            [(8, 16), (16, 16), (16, 8), (10, 16)]
        self.video_sizes = [(2, 12, 12)] if self.onevision else []

    def make_config(self, text_extra):
        import transformers as tf

        if not self.onevision:
            return tf.LlavaNextConfig(
                vision_config=_clip_vision_config(8), text_config=text_config("llama", text_extra),
                image_token_index=IMAGE_TOKEN_ID, image_grid_pinpoints=[[8, 16], [16, 8], [16, 16]],
                image_seq_length=4, vision_feature_layer=-2, vision_feature_select_strategy="default",
                pad_token_id=PAD_ID,
            )
        return tf.LlavaOnevisionConfig(
            vision_config=tf.SiglipVisionConfig(**_SMALL_VISION, image_size=12, patch_size=4, vision_use_head=False),
            text_config=text_config("qwen2", text_extra), image_token_index=IMAGE_TOKEN_ID,
            video_token_index=VIDEO_TOKEN_ID, image_grid_pinpoints=[[12, 12], [12, 24], [24, 12], [24, 24]],
            vision_aspect_ratio="anyres_max_9", vision_feature_layer=-1, vision_feature_select_strategy="full",
            pad_token_id=PAD_ID,
        )

    def make_item(self, model, kind, size, gen):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        s = model.config.vision_config.image_size
        if kind == "video":
            frames, h, w = size
            if (h, w) != (s, s):
                raise ValueError(f"{self.name} video frames must be {s}x{s}")
            return dict(pixel=torch.randn(frames, 3, s, s, generator=gen), size=size)
        # all tiles drawn now; llava_onevision drops to the base tile when the sample has several images
        n_tiles = image_size_to_num_patches(list(size), model.config.image_grid_pinpoints, s)
        return dict(pixel=torch.randn(n_tiles, 3, s, s, generator=gen), size=size)

    def _stack_tiles(self, items: list[dict], per_sample_counts: list[int]):
        tiles, k = [], 0
        for n in per_sample_counts:
            for _ in range(n):
                t = items[k]["pixel"]
                tiles.append(t[:1] if self.onevision and n > 1 else t)  # multi-image samples: base tile only
                k += 1
        m = max(t.shape[0] for t in tiles)
        pv = torch.zeros(len(tiles), m, *tiles[0].shape[1:])
        for i, t in enumerate(tiles):
            pv[i, : t.shape[0]] = t
        return pv, torch.tensor([list(it["size"]) for it in items], dtype=torch.long)

    def count_tokens(self, model, kinds, items):
        counts: list = [None] * len(items)
        img = [j for j, k in enumerate(kinds) if k == "image"]
        vid = [j for j, k in enumerate(kinds) if k == "video"]
        dev = model.device
        if img:
            pv, sizes = self._stack_tiles([items[j] for j in img], [len(img)])
            kw = dict(batch_num_images=torch.tensor([len(img)])) if self.onevision else {}
            feats = model.model.get_image_features(pv.to(dev), sizes.to(dev), return_dict=True, **kw).pooler_output
            for j, f in zip(img, feats):
                counts[j] = f.shape[0]
        if vid:
            pvv = torch.stack([items[j]["pixel"] for j in vid]).to(dev)
            feats = model.model.get_video_features(pvv, return_dict=True).pooler_output
            vc = model.config.vision_config
            side = -(-(vc.image_size // vc.patch_size) // 2)
            for j, f in zip(vid, feats):
                assert f.shape[0] == items[j]["size"][0] * side * side + 1, (f.shape, items[j]["size"])
                counts[j] = f.shape[0]
        return [int(c) for c in counts]

    def collate(self, samples):
        out = {}
        images = [item for pairs in samples for kind, item in pairs if kind == "image"]
        videos = [item for pairs in samples for kind, item in pairs if kind == "video"]
        per_sample = [sum(kind == "image" for kind, _ in pairs) for pairs in samples]
        if images:
            out["pixel_values"], out["image_sizes"] = self._stack_tiles(images, [n for n in per_sample if n])
            if self.onevision:
                out["batch_num_images"] = torch.tensor(per_sample, dtype=torch.long)
        if videos:
            if len({it["pixel"].shape[0] for it in videos}) != 1:
                raise ValueError("llava_onevision videos in one batch need the same frame count")
            out["pixel_values_videos"] = torch.stack([it["pixel"] for it in videos])
        return out


class TiledImages(FamilySpec):
    """An image is ``size`` tiles of a fixed square size, each a separate pixel tensor in the batch.

    ``internvl`` (InternViT 16 px, patch 4, pixel shuffle 0.5): 4 tokens per tile, each image wrapped as
    ``<img> ... </img>``; pixel_values (n_tiles_in_batch, 3, 16, 16). Text model: Qwen2 (``internvl``), Qwen3
    (``internvl_qwen3``, QK-norm) or Llama (``internvl_llama``).
    ``smolvlm`` / ``idefics3`` (SigLIP 16 px, patch 4, pixel shuffle 2, Llama text model): 4 tokens per tile,
    tiles separated by ``<fake_token_around_image>`` (VISION_START_ID); pixel_values (batch, max_tiles_per_sample,
    3, 16, 16), zero tiles as padding (the model drops all-zero tiles).
    """

    image_sizes = [1, 2, 3]
    side = 16

    def __init__(self, name: str, model_type: str, model_class: str, text: str = "llama"):
        self.name, self.model_type, self.model_class, self.text = name, model_type, model_class, text

    def make_config(self, text_extra):
        import transformers as tf

        text = text_config(self.text, text_extra)
        if self.model_type == "internvl":
            vision = dict(_SMALL_VISION, image_size=[self.side] * 2, patch_size=[4, 4])
            return tf.InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                                     downsample_ratio=0.5)
        config_class = tf.SmolVLMConfig if self.model_type == "smolvlm" else tf.Idefics3Config
        return config_class(vision_config=dict(_SMALL_VISION, image_size=self.side, patch_size=4), text_config=text,
                            image_token_id=IMAGE_TOKEN_ID, scale_factor=2)

    def make_item(self, model, kind, size, gen):
        return dict(pixel=torch.randn(int(size), 3, self.side, self.side, generator=gen), size=int(size))

    def count_tokens(self, model, kinds, items):
        if not items:
            return []
        tiles = torch.cat([it["pixel"] for it in items]).to(model.device)
        if self.model_type == "internvl":
            feats = model.model.get_image_features(
                tiles, vision_feature_layer=model.config.vision_feature_layer,
                vision_feature_select_strategy=model.config.vision_feature_select_strategy, return_dict=True,
            ).pooler_output
            per_tile = feats.shape[1]
        else:
            feats = model.model.get_image_features(tiles[None], return_dict=True).pooler_output[0]
            per_tile = feats.shape[0] // tiles.shape[0]
        assert per_tile == 4, per_tile  # (16 / 4)^2 patches, pixel-shuffled 2x2
        return [per_tile * it["size"] for it in items]

    def placeholder(self, kind, n, item):
        if self.model_type == "internvl":
            return wrapped([IMAGE_TOKEN_ID] * n, [IMAGE] * n)
        ids, codes, per_tile = [], [], n // item["size"]
        for _ in range(item["size"]):
            ids += [VISION_START_ID] + [IMAGE_TOKEN_ID] * per_tile
            codes += [TEXT] + [IMAGE] * per_tile
        return ids + [VISION_START_ID], codes + [TEXT]

    def collate(self, samples):
        tiles = [torch.cat([item["pixel"] for _, item in pairs]) if pairs else None for pairs in samples]
        if all(t is None for t in tiles):
            return {}
        if self.model_type == "internvl":
            return {"pixel_values": torch.cat([t for t in tiles if t is not None])}
        most = max(t.shape[0] for t in tiles if t is not None)
        pv = torch.zeros(len(samples), most, 3, self.side, self.side)
        for b, t in enumerate(tiles):
            if t is not None:
                pv[b, : t.shape[0]] = t
        return {"pixel_values": pv}


class Mistral3(FamilySpec):
    """Pixtral vision (patch 4, spatial merge 2): an (h, w) image gives (h/8) rows of (w/8) tokens; as in the
    processor, each row is followed by ``[IMG_BREAK]`` (ROW_BREAK_ID), the last by ``[IMG_END]`` (VISION_END_ID),
    both text ids. (16,24) -> 6, (8,16) -> 2, (24,16) -> 6, (16,16) -> 4 tokens. Inputs: pixel_values
    (n_images, 3, H_max, W_max) zero-padded, image_sizes (n_images, 2). Text model: Mistral (``mistral3``) or
    Ministral 3 (``mistral3_ministral3``: YaRN RoPE and Llama-4 query scaling by position; its inputs include
    ``position_ids`` counting real tokens, as generate() passes them, since an absolute-position query scale would
    otherwise differ between a left-padded sample and the same sample alone)."""

    model_type, model_class = "mistral3", "Mistral3ForConditionalGeneration"
    image_sizes = [(16, 24), (8, 16), (24, 16), (16, 16)]

    def __init__(self, name: str, text: str):
        self.name, self.text = name, text

    def make_config(self, text_extra):
        import transformers as tf

        vision = dict(_SMALL_VISION, model_type="pixtral", image_size=32, patch_size=4, head_dim=16)
        return tf.Mistral3Config(vision_config=vision, text_config=text_config(self.text, text_extra),
                                 image_token_index=IMAGE_TOKEN_ID, spatial_merge_size=2)

    def make_item(self, model, kind, size, gen):
        h, w = size
        return dict(pixel=torch.randn(3, h, w, generator=gen), size=(h, w), grid=(h // 8, w // 8))

    def _pad(self, items):
        h = max(it["size"][0] for it in items)
        w = max(it["size"][1] for it in items)
        pv = torch.zeros(len(items), 3, h, w)
        for i, it in enumerate(items):
            pv[i, :, : it["size"][0], : it["size"][1]] = it["pixel"]
        return pv, torch.tensor([list(it["size"]) for it in items], dtype=torch.long)

    def count_tokens(self, model, kinds, items):
        if not items:
            return []
        pv, sizes = self._pad(items)
        feats = model.model.get_image_features(pv.to(model.device), sizes.to(model.device), return_dict=True)
        counts = [f.shape[0] for f in feats.pooler_output]
        assert counts == [it["grid"][0] * it["grid"][1] for it in items], counts
        return counts

    def placeholder(self, kind, n, item):
        rows, cols = item["grid"]
        ids, codes = [], []
        for _ in range(rows):
            ids += [IMAGE_TOKEN_ID] * cols + [ROW_BREAK_ID]
            codes += [IMAGE] * cols + [TEXT]
        ids[-1] = VISION_END_ID
        return ids, codes

    def collate(self, samples):
        items = [item for pairs in samples for _, item in pairs]
        if not items:
            return {}
        pv, sizes = self._pad(items)
        return {"pixel_values": pv, "image_sizes": sizes}

    def extra_inputs(self, mm_types, attention_mask):
        if self.text != "ministral3":
            return {}
        # Ministral 3 scales queries by absolute position, so left padding must not shift positions: pass them as
        # generate() computes them (running count of real tokens).
        return {"position_ids": (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)}


class Gemma3(OneTensorPerImage):
    """SigLIP 16 px, patch 4, ``mm_tokens_per_image=16``: 16 tokens per image (sizes are ignored; the processor
    resizes), wrapped as ``<start_of_image> ... <end_of_image>``. Text model: sandwich norms, QK-norm,
    ``query_pre_attn_scalar=24``, layers [sliding, global, sliding, global] with ``sliding_window=8`` (shorter than
    an image: sliding layers' text queries really lose part of it). Inputs: pixel_values (n_images, 3, 16, 16) and
    ``token_type_ids`` (1 at image tokens), which turns on the bidirectional attention between image tokens."""

    name = model_type = "gemma3"
    model_class = "Gemma3ForConditionalGeneration"
    image_sizes = [(16, 16)]

    def make_config(self, text_extra):
        import transformers as tf

        text = text_config("gemma3_text", text_extra)
        vision = dict(_SMALL_VISION, model_type="siglip_vision_model", image_size=16, patch_size=4)
        return tf.Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=16,
                               image_token_index=IMAGE_TOKEN_ID, boi_token_index=VISION_START_ID,
                               eoi_token_index=VISION_END_ID)

    def tokens_per_image(self, model):
        return model.config.mm_tokens_per_image

    def placeholder(self, kind, n, item):
        return wrapped([IMAGE_TOKEN_ID] * n, [IMAGE] * n)

    def extra_inputs(self, mm_types, attention_mask):
        return {"token_type_ids": (mm_types == IMAGE).long()}


SPECS = [
    Llava(),
    Llava("llava_mistral", "mistral"),
    LlavaNext("llava_next"),
    LlavaNext("llava_onevision"),
    TiledImages("internvl", "internvl", "InternVLForConditionalGeneration", text="qwen2"),
    TiledImages("internvl_qwen3", "internvl", "InternVLForConditionalGeneration", text="qwen3"),
    TiledImages("internvl_llama", "internvl", "InternVLForConditionalGeneration", text="llama"),
    TiledImages("smolvlm", "smolvlm", "SmolVLMForConditionalGeneration"),
    TiledImages("idefics3", "idefics3", "Idefics3ForConditionalGeneration"),
    Mistral3("mistral3", "mistral"),
    Mistral3("mistral3_ministral3", "ministral3"),
    Gemma3(),
]
