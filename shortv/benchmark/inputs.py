"""What a benchmark feeds the model: `BenchInputs` (ready ``generate`` inputs plus the positions ShortV freezes),
built from token ids and an explicit mask (bare causal LMs, shape mode) or from a processor's output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..registry import visual_token_ids
from .shapes import make_token_layout

DEFAULT_PROMPT = "Describe this image in detail. What objects are there, what colors do they have and where are they?"


@dataclass
class BenchInputs:
    """Ready ``generate`` inputs plus the prompt positions ShortV freezes.

    ``visual_mask`` (bool, batch x seq) is the ground truth used for the FLOPs count. With ``explicit_mask`` it is
    also handed to the model (bare ``*ForCausalLM``); otherwise the model derives it from its visual token ids.
    """

    kwargs: dict[str, Any]
    visual_mask: torch.Tensor
    explicit_mask: bool

    @classmethod
    def for_causal_lm(cls, input_ids: torch.Tensor, visual_mask: torch.Tensor) -> BenchInputs:
        if input_ids.shape != visual_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and visual_mask {tuple(visual_mask.shape)} differ")
        kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        return cls(kwargs=kwargs, visual_mask=visual_mask.bool(), explicit_mask=True)

    @classmethod
    def from_model_inputs(
        cls, model: nn.Module, inputs: dict[str, Any], visual_mask: torch.Tensor | None = None
    ) -> BenchInputs:
        """Inputs of a multimodal model (e.g. a processor's output). The mask comes from its visual token ids."""
        kwargs = dict(inputs)
        input_ids = kwargs.get("input_ids")
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError("benchmark inputs need `input_ids`")
        if visual_mask is not None:
            return cls(kwargs=kwargs, visual_mask=visual_mask.bool(), explicit_mask=True)
        ids = visual_token_ids(model)
        if not ids:
            raise ValueError(
                f"{type(model).__name__} has no visual token ids in its config: pass `visual_mask=` explicitly"
            )
        mask = torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))
        return cls(kwargs=kwargs, visual_mask=mask, explicit_mask=False)

    @property
    def batch_size(self) -> int:
        return int(self.visual_mask.shape[0])

    def token_counts(self) -> list[tuple[int, int]]:
        """Per sample ``(t, v)``: updated tokens (text and padding) and frozen visual tokens of the prompt."""
        seq = int(self.visual_mask.shape[1])
        visual = self.visual_mask.sum(dim=1).tolist()
        return [(seq - int(v), int(v)) for v in visual]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> BenchInputs:
        """Tensors moved to ``device``; floating tensors (pixels) cast to ``dtype`` when given."""
        moved = {}
        for key, value in self.kwargs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device)
                if dtype is not None and value.is_floating_point():
                    value = value.to(dtype)
            moved[key] = value
        return BenchInputs(kwargs=moved, visual_mask=self.visual_mask.to(device), explicit_mask=self.explicit_mask)


def causal_lm_inputs(
    batch_size: int, text_tokens: int, visual_tokens: int, vocab_size: int, seed: int = 0
) -> BenchInputs:
    """``batch_size`` rows of random ids: ``text_tokens`` text ids around one block of ``visual_tokens`` ids declared
    visual with an explicit mask (`shapes.make_token_layout`), for a bare causal LM or a shape model."""
    layout = make_token_layout(batch_size, text_tokens, visual_tokens, vocab_size=vocab_size, seed=seed)
    return BenchInputs.for_causal_lm(layout.input_ids, layout.visual_mask)


def _synthetic_image(size: tuple[int, int], seed: int = 0) -> Any:
    """A deterministic RGB noise image (timing does not depend on content)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[0], size[1], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), mode="RGB")


def _processor_image_size(processor: Any) -> tuple[int, int]:
    image_processor = getattr(processor, "image_processor", None)
    for attribute in ("crop_size", "size"):
        size = getattr(image_processor, attribute, None)
        if size is None:
            continue
        if isinstance(size, int):
            return size, size
        get = size.get if isinstance(size, dict) else lambda key, _s=size: getattr(_s, key, None)
        height, width = get("height"), get("width")
        if height and width:
            return int(height), int(width)
        shortest = get("shortest_edge")
        if shortest:
            return int(shortest), int(shortest)
    return 336, 336


def _prompt_text(processor: Any, prompt: str) -> str:
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    image_token = getattr(processor, "image_token", None) or "<image>"
    return f"{image_token}\n{prompt}"


def multimodal_inputs(
    model: nn.Module, processor: Any, batch_size: int = 1, prompt: str = DEFAULT_PROMPT, seed: int = 0
) -> BenchInputs:
    """One synthetic image and ``prompt`` per sample, through the model's own processor (chat template if any)."""
    size = _processor_image_size(processor)
    images = [_synthetic_image(size, seed + i) for i in range(batch_size)]
    texts = [_prompt_text(processor, prompt)] * batch_size
    encoded = processor(images=images, text=texts, return_tensors="pt", padding=True)
    return BenchInputs.from_model_inputs(model, dict(encoded))
