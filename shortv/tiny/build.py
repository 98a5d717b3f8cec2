"""Processor and (untrained) model of the embedded tiny LLaVA.

* tokenizer: word level (``tokenizers`` WordLevel), lower-casing, wrapped as a
  transformers fast tokenizer; ``<s>`` is prepended automatically;
* image processor: the PIL (slow) CLIP image processor at 96x96;
* processor: a stock :class:`~transformers.LlavaProcessor` that expands
  ``<image>`` into :data:`IMAGE_TOKENS` placeholders (6x6 patches of 16 px,
  CLS dropped by the ``"default"`` feature-selection strategy);
* model: a stock :class:`~transformers.LlavaForConditionalGeneration`
  (CLIP vision tower, 2-layer MLP projector, Llama language model).  The
  vision tower's absolute position table is zero (:func:`build_model`), so
  where a patch lies is known to the language model only from the order of
  the visual tokens.

Prompts use the LLaVA-1.5 conversation format::

    USER: <image>\\n{prompt} ASSISTANT: {answer}</s>
"""

from __future__ import annotations

from typing import Any

from . import synthetic

__all__ = [
    "CHAT_TEMPLATE",
    "IMAGE_TOKEN",
    "IMAGE_TOKENS",
    "MODEL_DIMS",
    "PATCH_SIZE",
    "SPECIAL_TOKENS",
    "build_config",
    "build_image_processor",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "format_prompt",
    "vocab",
]

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_TOKEN_ID = range(len(SPECIAL_TOKENS))

PATCH_SIZE = 16
IMAGE_SIZE = synthetic.IMAGE_SIZE
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 36; CLS is dropped ("default" strategy)

# Words of the conversation format plus a few common chat words (never trained,
# but they keep ordinary prompts from collapsing into <unk>).
CHAT_WORDS = (
    "user", "assistant", "system", ":", ".", ",", "!", "'",
    "answer", "with", "single", "word", "image", "picture", "in", "this", "please", "and", "an",
)

MODEL_DIMS: dict[str, Any] = {
    "text_hidden": 128,
    "text_layers": 12,
    "text_heads": 4,
    "text_intermediate": 384,
    "vision_hidden": 192,
    "vision_layers": 2,
    "vision_heads": 4,
    "vision_intermediate": 768,
    # Larger than Llama's 0.02 (tuned for hidden sizes in the thousands): at hidden 128 the
    # smaller init leaves the LM on a long plateau where it ignores the image.
    "text_init_std": 0.06,
}

# LLaVA-1.5 style; accepts string contents or lists of {"type": "image"|"text"} parts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set images = [] -%}{%- set texts = [message['content']] -%}"
    "{%- else -%}"
    "{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list -%}"
    "{%- set texts = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | list -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ texts | join(' ') }}{{ ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'ASSISTANT: ' }}{{ texts | join(' ') }}{{ '</s>' }}"
    "{%- else -%}"
    "{{ message['role'] | upper }}{{ ': ' }}"
    "{%- for _ in images -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{{ texts | join(' ') }}{{ ' ' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def format_prompt(prompt: str, image: bool = True) -> str:
    """The single-turn conversation text for ``prompt``, ending with ``ASSISTANT:``."""
    return f"USER: {IMAGE_TOKEN}\n{prompt} ASSISTANT:" if image else f"USER: {prompt} ASSISTANT:"


def vocab() -> dict[str, int]:
    """Token -> id: special tokens first, then every word, sorted."""
    words = sorted(set(synthetic.vocabulary()) | set(CHAT_WORDS))
    return {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + words)}


def build_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab(), unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",  # batched generation
        model_max_length=512,
        chat_template=CHAT_TEMPLATE,
    )


def build_image_processor():
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True,
        do_center_crop=True,
    )


def build_processor():
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLS of the CLIP vision tower
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def build_config(**dims):
    """The :class:`~transformers.LlavaConfig`; keyword arguments override :data:`MODEL_DIMS`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    unknown = set(dims) - set(MODEL_DIMS)
    if unknown:
        raise TypeError(f"unknown model dimensions: {sorted(unknown)}")
    d = {**MODEL_DIMS, **dims}
    vision = CLIPVisionConfig(
        hidden_size=d["vision_hidden"],
        intermediate_size=d["vision_intermediate"],
        num_hidden_layers=d["vision_layers"],
        num_attention_heads=d["vision_heads"],
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        hidden_act="quick_gelu",
        projection_dim=d["vision_hidden"],
    )
    text = LlamaConfig(
        vocab_size=len(vocab()),
        hidden_size=d["text_hidden"],
        intermediate_size=d["text_intermediate"],
        num_hidden_layers=d["text_layers"],
        num_attention_heads=d["text_heads"],
        num_key_value_heads=d["text_heads"],
        max_position_embeddings=512,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
        initializer_range=d["text_init_std"],
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=IMAGE_TOKENS,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def build_model(seed: int = 0, **dims):
    """A freshly initialised :class:`~transformers.LlavaForConditionalGeneration` (fp32).

    The vision tower's absolute position embeddings are zeroed: a tower without
    them (its attention has no notion of where a patch lies) sees what is in
    each patch but not where, so locating things is left to the language
    model, which knows the order of the visual tokens.  Training keeps them at
    zero (:mod:`shortv.tiny.train`).
    """
    import torch
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(**dims))
    with torch.no_grad():
        model.model.vision_tower.embeddings.position_embedding.weight.zero_()
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        do_sample=False,
        max_new_tokens=8,
    )
    return model
