"""Tiny random-weight models of every supported family, and batches of inputs with known visual positions.

Every model is built from transformers config classes only (no hub access), in fp32, from a fixed seed, in
``eval()`` mode, with a selectable attention implementation ("sdpa" or "eager", applied to the text model and the
vision tower). Text models: hidden 64, 4 decoder layers (indices 0..3), 4 query heads / 2 KV heads (GQA),
intermediate 128, vocab 200. Vision towers: hidden 32, 2-3 layers, images of 8..32 pixels.

Layout of this package: `core` (the API below, the input builder and the `FamilySpec` protocol each family
implements), `llava_like` (families fed one pixel tensor per image or tile: LLaVA 1.5/NeXT/OneVision, InternVL,
SmolVLM, Idefics3, Mistral 3, Gemma 3), `grid_like` (families fed flattened patch grids with ``*_grid_thw`` and
3-D M-RoPE: Qwen2-VL, Qwen2.5-VL, Qwen3-VL dense/MoE, GLM-4.1V) and `text_only` (bare causal LMs). Each family's
token counts and quirks are documented on its spec class.

API
---
``FAMILIES``
    All family keys. A key is the ``config.model_type`` of the top-level model, except variants that differ in the
    language model: ``llava_mistral`` (LLaVA with a Mistral LM), ``internvl_qwen3`` / ``internvl_llama``,
    ``mistral3_ministral3``. ``MULTIMODAL_FAMILIES`` / ``TEXT_ONLY_FAMILIES`` / ``VIDEO_FAMILIES`` split them;
    ``MODEL_TYPES[family]`` gives the model_type. ``SPECS[family]`` is the family's `FamilySpec`.

``build_model(family, attn_implementation="sdpa", seed=0, init_std=None, text_overrides=None) -> PreTrainedModel``
    ``init_std`` (default: the configs' 0.02) overrides ``initializer_range`` of every (sub)config;
    ``text_overrides`` are extra keyword arguments for the text config (e.g. ``{"sliding_window": 8}``).
    The generation config gets pad/bos/eos ids and ``do_sample=False``.

``build_inputs(model, family, *, batch_layouts=None, padding_side="left", seed=0) -> TinyInputs``
    ``TinyInputs`` is a ``dict`` ready for ``model(**inputs)`` and ``model.generate(**inputs)``; the ground truth
    is carried as attributes, not keys:

    - ``visual_mask``: bool (batch, seq), True at image *and* video feature positions (for the bare causal LMs: the
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
    What a ``size`` means is the family's (see its spec: pixels ``(h, w)``, ``(frames, h, w)``, tiles, or, for the
    bare causal LMs, the number of visual tokens of the block; there ``scatter=True`` makes each block alternate
    visual/text tokens). Sizes left out cycle through the family's size list starting at an offset given by the
    sample seed, so samples in a batch get different token counts. ``seed`` defaults to
    ``seed * 10007 + sample_index``; every random value of a sample (token ids, pixels) comes from its own seed
    only, so ``sample(i)`` rebuilds it alone. Padding uses ``PAD_ID`` with ``attention_mask`` 0 (left or right).
    Visual items are wrapped in the family's own marker tokens (``VISION_START_ID`` / ``VISION_END_ID``,
    ``ROW_BREAK_ID``...), which are text, as in the real processors.

``single_sample_inputs(inputs, i)``  == ``inputs.sample(i)``.
``reset_state(model)``  clears cached state between unrelated calls (the Qwen/GLM ``model.model.rope_deltas``).
``default_layouts(family, batch_size=3)``  mixed layouts (multi-image, and a video where supported).

Token ids: ``PAD_ID=0, BOS_ID=1, EOS_ID=2``, text tokens in ``[3, 180)``, ``IMAGE_TOKEN_ID=190``,
``VIDEO_TOKEN_ID=191``, ``VISION_START_ID=192``, ``VISION_END_ID=193``, ``ROW_BREAK_ID=194``,
``VIDEO_START_ID=195``, ``VIDEO_END_ID=196``.

Padding: forward works with left or right padding for every family. ``generate`` works with both but should be
given left padding (the usual decoder-only rule). Batch-vs-alone parity (fp32 logits at the non-pad columns) holds
for every family, both padding sides and both attention implementations: about 2e-7 with the default init. Families
that compute positions as ``arange`` give left-padded samples positions shifted by the pad count; RoPE is relative,
so that only moves logits by float rounding. With ``init_std=0.2`` logits reach ~6 and the batch-vs-alone noise
reaches ~1.5e-5 on either padding side, because matmuls and the vision tower run on other shapes in a batch than
alone: compare with atol ~5e-5..1e-4 there, not 1e-5.
"""

from .core import *  # noqa: F401,F403  (the API; core.__all__ lists it)
from .core import __all__  # noqa: F401
