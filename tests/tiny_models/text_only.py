"""Bare causal LMs (``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``gemma3_text``): the caller declares which
positions are visual.

Inputs are input_ids + attention_mask only; the "visual" blocks are ordinary random token ids and ``visual_mask``
is the ground truth to hand to the library. An image/video "size" is the number of visual tokens of the block;
``scatter=True`` makes each block alternate visual and text tokens (v t v t ... v). ``mistral`` has
``sliding_window=None`` unless ``text_overrides={"sliding_window": 8}`` (parity and generate hold with it too; for
``qwen2`` use ``{"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}``, which makes layers
2-3 sliding).
"""

from __future__ import annotations

import torch

from .base import IMAGE, TEXT, TEXT_ID_RANGE, VIDEO, FamilySpec, text_config


class TextOnly(FamilySpec):
    text_only = True
    image_sizes = [6, 4, 5]
    video_sizes = [7, 3]

    def __init__(self, name: str, model_class: str):
        self.name = self.model_type = name
        self.model_class = model_class

    def make_config(self, text_extra):
        return text_config(self.name, text_extra)

    def make_item(self, model, kind, size, gen):
        return {"size": size}

    def count_tokens(self, model, kinds, items):
        return [int(item["size"]) for item in items]

    def placeholder(self, kind, n, item):
        scatter = item["scatter"]
        block = torch.randint(*TEXT_ID_RANGE, (2 * n - 1 if scatter else n,), generator=item["gen"]).tolist()
        code = IMAGE if kind == "image" else VIDEO
        return block, [code if (not scatter or q % 2 == 0) else TEXT for q in range(len(block))]


SPECS = [TextOnly("llama", "LlamaForCausalLM"), TextOnly("mistral", "MistralForCausalLM"),
         TextOnly("qwen2", "Qwen2ForCausalLM"), TextOnly("qwen3", "Qwen3ForCausalLM"),
         TextOnly("gemma3_text", "Gemma3ForCausalLM")]
