"""Constants and the `FamilySpec` protocol: what the input builder needs to know about one family."""

from __future__ import annotations

from typing import Any

import torch

VOCAB_SIZE = 200
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TEXT_ID_RANGE = (3, 180)
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 190, 191
VISION_START_ID, VISION_END_ID = 192, 193
ROW_BREAK_ID = 194
VIDEO_START_ID, VIDEO_END_ID = 195, 196
#: Modality code of a token: text (and marker tokens), image feature, video feature (as ``mm_token_type_ids``).
TEXT, IMAGE, VIDEO = 0, 1, 2

TEXT_DIMS = dict(
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
HEAD_DIM = TEXT_DIMS["hidden_size"] // TEXT_DIMS["num_attention_heads"]
VISION_HIDDEN = 32


def text_config(kind: str, extra: dict) -> Any:
    """A tiny Llama / Mistral / Qwen2 / Qwen3 / Ministral3 / Gemma 3 text config (``sliding_window=None`` for
    Mistral)."""
    import transformers as tf

    classes = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "qwen3": tf.Qwen3Config, "ministral3": tf.Ministral3Config, "gemma3_text": tf.Gemma3TextConfig}
    kwargs = dict(TEXT_DIMS)
    if kind == "gemma3_text":  # sandwich norms, QK-norm; sliding window 8 on layers 0 and 2
        kwargs.update(head_dim=HEAD_DIM, sliding_window=8, query_pre_attn_scalar=24,
                      layer_types=["sliding_attention", "full_attention"] * 2)
    if kind in ("mistral", "ministral3"):
        kwargs["sliding_window"] = None
    if kind == "qwen3":
        kwargs["head_dim"] = HEAD_DIM
    if kind == "ministral3":  # as Ministral 3: YaRN RoPE and Llama-4 query scaling by position
        kwargs["rope_parameters"] = dict(rope_type="yarn", rope_theta=10000.0, factor=64.0,
                                         original_max_position_embeddings=8, llama_4_scaling_beta=0.1)
    kwargs.update(extra)
    return classes[kind](**kwargs)


class FamilySpec:
    """One family: its config, model class, what a visual item is, how many tokens it takes, how items batch.

    Per item (one image or video of one sample) `make_item` returns a dict with at least ``pixel``; per sample
    `count_tokens` runs the model's own vision code to count each item's features; `placeholder` gives the input
    ids and modality codes that stand for one item (marker tokens included); per batch `collate` stacks the items
    into the model's pixel inputs and `extra_inputs` adds per-token inputs such as ``mm_token_type_ids``.
    """

    name: str = ""
    model_type: str = ""
    model_class: str = ""
    image_sizes: list = []
    video_sizes: list = []
    text_only = False
    #: False when one batch cannot hold both images and videos (the model then mixes up their features).
    mixes_images_and_videos = True

    def make_config(self, text_extra: dict) -> Any:
        raise NotImplementedError

    def finalize(self, model: Any) -> None:
        """Set what a checkpoint would load but the config cannot (default: nothing)."""

    def make_item(self, model: Any, kind: str, size: Any, gen: torch.Generator) -> dict:
        raise NotImplementedError

    def count_tokens(self, model: Any, kinds: list[str], items: list[dict]) -> list[int]:
        raise NotImplementedError

    def placeholder(self, kind: str, n: int, item: dict) -> tuple[list[int], list[int]]:
        """Input ids and modality codes for one visual item of ``n`` features (default: the bare placeholders)."""
        code = IMAGE if kind == "image" else VIDEO
        return [IMAGE_TOKEN_ID if kind == "image" else VIDEO_TOKEN_ID] * n, [code] * n

    def collate(self, samples: list[list[tuple[str, dict]]]) -> dict:
        """Pixel inputs for a batch; ``samples[b]`` lists sample b's ``(kind, item)`` in sequence order."""
        raise NotImplementedError

    def extra_inputs(self, mm_types: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """Per-token inputs derived from the modality codes and attention mask (batch, seq) of the padded batch."""
        return {}


def wrapped(ids: list[int], codes: list[int], start: int = VISION_START_ID, end: int = VISION_END_ID):
    """``ids`` between a start and an end marker token (both text)."""
    return [start] + ids + [end], [TEXT] + codes + [TEXT]
