"""Each family's own processor class, built offline for the tiny models of tests/tiny_models.

A word-level tokenizer made in code (the words of the synthetic VQA data and of the chat templates, at ids
3..179) whose special tokens sit at the ids the tiny models expect (image placeholder 190, marker tokens 192..),
the family's PIL image processor at tiny sizes (torchvision is not needed), and a short chat template in the
family's style. The processors expand image placeholders exactly as for the real checkpoints, so what they
produce is what the data path (shortv.data, shortv.evaluation, the lmms-eval model) feeds real models.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from tiny_models.base import (
    BOS_ID,
    EOS_ID,
    IMAGE_TOKEN_ID,
    PAD_ID,
    ROW_BREAK_ID,
    TEXT_ID_RANGE,
    VIDEO_END_ID,
    VIDEO_START_ID,
    VIDEO_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
)

from shortv.tiny import synthetic

_WORDS = ("user", "assistant", "system", ":", ".", ",", "!", "'", "?", "answer", "with", "single", "word", "image",
          "picture", "in", "this", "please", "and", "an", "\n")
_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ BEGIN }}{{ message['role'] }}{{ ':' }}"
    "{%- if message['content'] is string -%}{{ ' ' + message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ ' ' + IMAGE }}{%- elif part['type'] == 'video' -%}{{ ' ' + VIDEO }}"
    "{%- else -%}{{ ' ' + part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{ END }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ BEGIN }}{{ 'assistant:' }}{%- endif -%}"
)


def _template(image: str, begin: str = " ", end: str = " ", video: str = "") -> str:
    return (_TEMPLATE.replace("IMAGE", repr(image)).replace("VIDEO", repr(video)).replace("BEGIN", repr(begin))
            .replace("END", repr(end)))


def _tokenizer(specials: dict[str, int], named: dict[str, str], chat_template: str, words: tuple = ()) -> Any:
    """Word-level fast tokenizer: ``specials`` token -> id, ``named`` e.g. {"image_token": "<image>"}; ``words``
    are extra text tokens (kept whole)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID}
    common = sorted(set(synthetic.vocabulary()) | set(_WORDS) | {"<unk>"} | {str(i) for i in range(10)})
    vocab = {word: TEXT_ID_RANGE[0] + i for i, word in enumerate([*common, *words])}
    assert max(vocab.values()) < TEXT_ID_RANGE[1]
    vocab.update(base)
    vocab.update(specials)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [*base, *specials]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in words])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side="left", model_max_length=512, chat_template=chat_template, extra_special_tokens=named,
    )


class _FrameSettings:
    """Stands in for a video processor where a processor reads its frame settings even for images (SmolVLM)."""

    num_frames, fps = 8, 1


@contextmanager
def _no_video_processor(*others: str):
    """Let a processor be built without a real video processor (and without ``others``, e.g. an audio feature
    extractor): video processors need torchvision, which this environment lacks, and transformers checks every
    processor attribute's class, None included. Image-only use (all that shortv's data path does) never runs them."""
    from transformers import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class

    def lenient(self, name, argument):
        return None if name in ("video_processor", *others) else check(self, name, argument)

    ProcessorMixin.check_argument_for_proper_class = lenient
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


def _frames(video: Any) -> list[Any]:
    """A video (PIL frames, or a (frames, height, width, 3) array) as a list of RGB PIL frames."""
    from PIL import Image

    return [frame.convert("RGB") if isinstance(frame, Image.Image) else Image.fromarray(frame) for frame in video]


def _normalized(frame: Any, size: tuple[int, int], mean: Any, std: Any) -> Any:
    """(3, height, width) float32: resized bicubic, scaled to [0, 1], normalized."""
    import numpy as np

    pixels = np.asarray(frame.resize((size[1], size[0]), resample=3), dtype=np.float32) / 255.0
    return ((pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)).transpose(2, 0, 1)


class PatchGridVideos:
    """Stands in for Qwen2-VL's video processor (transformers' needs torchvision, which this environment lacks):
    the same arithmetic, in numpy. Frames are resized to the image processor's ``smart_resize`` size of the first
    frame, normalized, padded to a multiple of ``temporal_patch_size`` by repeating the last frame, and cut into
    rows of ``temporal_patch_size`` x ``patch_size``^2 pixels in merge order, with ``video_grid_thw`` (t, h, w)."""

    def __init__(self, images: Any):
        self.images = images
        self.patch_size, self.temporal_patch_size = images.patch_size, images.temporal_patch_size
        self.merge_size = images.merge_size

    def __call__(self, videos: Any, **kwargs: Any) -> dict[str, Any]:
        import numpy as np
        import torch
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        from transformers.video_utils import make_batched_videos

        p, tp, m = self.patch_size, self.temporal_patch_size, self.merge_size
        rows, grids = [], []
        for video in make_batched_videos(videos):
            frames = _frames(video)
            height, width = smart_resize(frames[0].height, frames[0].width, factor=p * m,
                                         min_pixels=self.images.size["shortest_edge"],
                                         max_pixels=self.images.size["longest_edge"])
            array = np.stack([_normalized(f, (height, width), self.images.image_mean, self.images.image_std)
                              for f in frames])
            if len(array) % tp:
                array = np.concatenate([array, np.repeat(array[-1:], tp - len(array) % tp, axis=0)])
            t, h, w = len(array) // tp, height // p, width // p
            patches = array.reshape(t, tp, 3, h // m, m, p, w // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
            rows.append(patches.reshape(t * h * w, 3 * tp * p * p))
            grids.append((t, h, w))
        return {"pixel_values_videos": torch.from_numpy(np.concatenate(rows)),
                "video_grid_thw": torch.tensor(grids, dtype=torch.long)}


class FrameVideos:
    """Stands in for LLaVA-OneVision's video processor (needs torchvision): every frame resized to the vision
    tower's square side and normalized; ``pixel_values_videos`` (videos, frames, 3, side, side)."""

    def __init__(self, side: int, mean: Any, std: Any):
        self.side, self.mean, self.std = side, mean, std

    def __call__(self, videos: Any, **kwargs: Any) -> dict[str, Any]:
        import numpy as np
        import torch
        from transformers.video_utils import make_batched_videos

        stacked = [np.stack([_normalized(f, (self.side, self.side), self.mean, self.std) for f in _frames(video)])
                   for video in make_batched_videos(videos)]
        return {"pixel_values_videos": torch.from_numpy(np.stack(stacked))}


def build_processor(family: str) -> Any:
    """The processor of ``family`` (a key of tiny_models.FAMILIES, multimodal) for its tiny model. ``qwen2_vl`` and
    ``llava_onevision`` take videos too (through the stand-in video processors above)."""
    import transformers as tf

    if family == "qwen2_vl":
        specials = {"<|image_pad|>": IMAGE_TOKEN_ID, "<|video_pad|>": VIDEO_TOKEN_ID,
                    "<|vision_start|>": VISION_START_ID, "<|vision_end|>": VISION_END_ID}
        template = _template("<|vision_start|><|image_pad|><|vision_end|>",
                             video="<|vision_start|><|video_pad|><|vision_end|>")
        images = tf.Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2,
                                             size={"shortest_edge": 16 * 16, "longest_edge": 24 * 24})
        with _no_video_processor():
            return tf.Qwen2VLProcessor(image_processor=images, tokenizer=_tokenizer(specials, {}, template),
                                       video_processor=PatchGridVideos(images), chat_template=template)
    if family == "llava_onevision":
        specials = {"<image>": IMAGE_TOKEN_ID, "<video>": VIDEO_TOKEN_ID}
        template = _template("<image>", video="<video>")
        pinpoints = [[12, 12], [12, 24], [24, 12], [24, 24]]
        images = tf.LlavaOnevisionImageProcessorPil(size={"height": 12, "width": 12}, image_grid_pinpoints=pinpoints)
        videos = FrameVideos(12, images.image_mean, images.image_std)
        with _no_video_processor():
            return tf.LlavaOnevisionProcessor(image_processor=images, tokenizer=_tokenizer(specials, {}, template),
                                              video_processor=videos, num_image_tokens=9,
                                              vision_feature_select_strategy="full", chat_template=template)

    if family.startswith(("qwen3_vl", "qwen3_5")) or family == "glm4v":  # patch grids: 4 px patches, 2 x 2 merge
        qwen = family != "glm4v"
        image, start, end = ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>") if qwen else (
            "<|image|>", "<|begin_of_image|>", "<|end_of_image|>")
        specials = {image: IMAGE_TOKEN_ID, start: VISION_START_ID, end: VISION_END_ID,
                    "<|video_pad|>" if qwen else "<|video|>": VIDEO_TOKEN_ID}
        if not qwen:
            specials.update({"<|begin_of_video|>": VIDEO_START_ID, "<|end_of_video|>": VIDEO_END_ID})
        template = _template(start + image + end)
        image_processor = tf.Qwen2VLImageProcessorPil if qwen else tf.Glm4vImageProcessorPil
        processor = tf.Qwen3VLProcessor if qwen else tf.Glm4vProcessor
        images = image_processor(patch_size=4, temporal_patch_size=2, merge_size=2,
                                 size={"shortest_edge": 16 * 16, "longest_edge": 24 * 24})
        with _no_video_processor():
            return processor(image_processor=images, tokenizer=_tokenizer(specials, {}, template),
                             video_processor=None, chat_template=template)
    if family == "gemma3":
        specials = {"<image_soft_token>": IMAGE_TOKEN_ID, "<start_of_image>": VISION_START_ID,
                    "<end_of_image>": VISION_END_ID}
        named = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
        template = _template("<start_of_image>")
        images = tf.Gemma3ImageProcessorPil(size={"height": 16, "width": 16})
        return tf.Gemma3Processor(image_processor=images, tokenizer=_tokenizer(specials, named, template),
                                  image_seq_length=16, chat_template=template)
    if family == "gemma4":  # 64 px images: 16 x 16 patches of 4 px, pooled 2 x 2 into 64 soft tokens
        specials = {"<|image|>": IMAGE_TOKEN_ID, "<|video|>": VIDEO_TOKEN_ID, "<|image>": VISION_START_ID,
                    "<image|>": VISION_END_ID, "<|audio|>": 197, "<|audio>": 198, "<audio|>": 199}
        named = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                 "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"}
        template = _template("<|image|>")
        images = tf.Gemma4ImageProcessorPil(patch_size=4, pooling_kernel_size=2, max_soft_tokens=70)
        with _no_video_processor("feature_extractor"):
            return tf.Gemma4Processor(feature_extractor=None, image_processor=images, video_processor=None,
                                      tokenizer=_tokenizer(specials, named, template), chat_template=template)
    if family.startswith("mistral3"):
        specials = {"[IMG]": IMAGE_TOKEN_ID, "[IMG_BREAK]": ROW_BREAK_ID, "[IMG_END]": VISION_END_ID}
        template = _template("[IMG]")
        images = tf.PixtralImageProcessorPil(size={"longest_edge": 24}, patch_size={"height": 8, "width": 8})
        return tf.PixtralProcessor(image_processor=images, tokenizer=_tokenizer(specials, {}, template),
                                   patch_size=4, spatial_merge_size=2, chat_template=template)
    if family.startswith("internvl"):
        specials = {"<IMG_CONTEXT>": IMAGE_TOKEN_ID, "<img>": VISION_START_ID, "</img>": VISION_END_ID,
                    "<video>": VIDEO_TOKEN_ID}
        named = {"context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>", "end_image_token": "</img>",
                 "video_token": "<video>"}
        template = _template("<IMG_CONTEXT>")
        images = tf.GotOcr2ImageProcessorPil(size={"height": 16, "width": 16}, crop_to_patches=True, min_patches=1,
                                             max_patches=2)
        with _no_video_processor():
            return tf.InternVLProcessor(image_processor=images, tokenizer=_tokenizer(specials, named, template),
                                        video_processor=None, image_seq_length=4, chat_template=template)
    if family in ("smolvlm", "idefics3"):
        specials = {"<image>": IMAGE_TOKEN_ID, "<fake_token_around_image>": VISION_START_ID,
                    "<global-img>": VISION_END_ID, "<end_of_utterance>": VIDEO_END_ID}
        rows_cols = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))
        template = _template("<image>")
        kwargs = dict(do_image_splitting=True, size={"longest_edge": 32}, max_image_size={"longest_edge": 16})
        tokenizer = _tokenizer(specials, {}, template, words=rows_cols)
        if family == "idefics3":
            return tf.Idefics3Processor(image_processor=tf.Idefics3ImageProcessorPil(**kwargs), tokenizer=tokenizer,
                                        image_seq_len=4, chat_template=template)
        with _no_video_processor():
            return tf.SmolVLMProcessor(image_processor=tf.SmolVLMImageProcessorPil(**kwargs), tokenizer=tokenizer,
                                       video_processor=_FrameSettings(), image_seq_len=4, chat_template=template)
    raise ValueError(f"no tiny processor for {family!r}")
