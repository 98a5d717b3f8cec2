"""What is particular to the 2026 families: DeepStack, MoE, Gemma 3's masks, Mistral 3's break tokens, GLM-4.1V
video, and the layer-anatomy table. The checks every family passes are in test_parity.py."""

import pytest
import torch
from tiny_models import (
    FAMILIES,
    ROW_BREAK_ID,
    VISION_END_ID,
    build_inputs,
    build_model,
    reset_state,
)

from shortv import ShortVConfig, apply_shortv, disable_shortv, remove_shortv
from shortv.registry import ARCHITECTURES, LANGUAGE_MODELS, fast_layer_for, find_decoder_layers


def run(model, inputs):
    reset_state(model)
    with torch.no_grad():
        return model(**inputs).logits


def fast_and_reference(model, inputs, layers):
    """(fast logits, reference logits, unpatched logits) at the non-padding positions."""
    keep = inputs["attention_mask"].bool()
    baseline = run(model, inputs)
    apply_shortv(model, ShortVConfig(layers, mode="reference"))
    reference = run(model, inputs)
    apply_shortv(model, ShortVConfig(layers))
    fast = run(model, inputs)
    remove_shortv(model)
    return fast[keep], reference[keep], baseline[keep]


def layer_io(model, inputs, indices):
    """Inputs and outputs of the decoder layers ``indices`` in one forward, and their call kwargs."""
    seen = {}

    def hook(index):
        def record(module, args, kwargs, output):
            seen[index] = (args[0] if args else kwargs["hidden_states"], output, kwargs)

        return record

    layers = find_decoder_layers(model)
    handles = [layers[i].register_forward_hook(hook(i), with_kwargs=True) for i in indices]
    try:
        run(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_deepstack_still_adds_vision_features_after_frozen_first_layers(family):
    model = build_model(family, init_std=0.2)
    inputs = build_inputs(model, family)  # images, two images, a video
    fast, reference, baseline = fast_and_reference(model, inputs, [0, 1, 2])
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)
    assert (fast - baseline).abs().max() > 1e-3

    # DeepStack runs outside the layers: with layer 0 frozen, the visual states entering layer 1 are exactly those
    # entering layer 0 plus the first DeepStack features (as in the reference semantics), not left unchanged.
    added = []
    text_model = model.model.language_model

    def recording(hidden, mask, embeds):
        added.append(embeds)
        return type(text_model)._deepstack_process(text_model, hidden, mask, embeds)

    text_model._deepstack_process = recording
    apply_shortv(model, [0, 1, 2])
    try:
        seen = layer_io(model, inputs, [0, 1])
    finally:
        remove_shortv(model)
        del text_model._deepstack_process
    visual = inputs.visual_mask
    assert len(added) == 3 and added[0].abs().max() > 0
    assert torch.equal(seen[0][1][visual], seen[0][0][visual])  # frozen
    assert torch.equal(seen[1][0][visual], seen[0][0][visual] + added[0])


def test_moe_router_and_experts_see_only_text_rows():
    model = build_model("qwen3_vl_moe", init_std=0.2)
    inputs = build_inputs(model, "qwen3_vl_moe")
    block = find_decoder_layers(model)[1].mlp
    rows = []
    handles = [module.register_forward_hook(lambda m, args, out: rows.append((m, args[0].shape[:-1].numel())))
               for module in (block.gate, block.experts)]
    try:
        run(model, inputs)
        unpatched = dict(rows)
        rows.clear()
        apply_shortv(model, [1])
        run(model, inputs)
        frozen = dict(rows)
    finally:
        remove_shortv(model)
        for handle in handles:
            handle.remove()
    n_tokens = inputs["input_ids"].numel()
    n_text = n_tokens - int(inputs.visual_mask.sum())
    assert unpatched == {block.gate: n_tokens, block.experts: n_tokens}
    assert frozen == {block.gate: n_text, block.experts: n_text}


def _visible(mask):
    return mask if mask.dtype == torch.bool else mask == 0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gemma3_sliding_window_cuts_the_image_for_text_queries(attn):
    model = build_model("gemma3", attn, init_std=0.2)  # sliding_window 8 < 16 tokens per image
    assert model.config.text_config.sliding_window < model.config.mm_tokens_per_image
    layouts = [dict(n_text_before=2, images=2, n_text_between=3, n_text_after=5), dict(n_text_before=4, images=1)]
    inputs = build_inputs(model, "gemma3", batch_layouts=layouts)
    seen = layer_io(model, inputs, [0, 1])  # layer 0 sliding, layer 1 global
    sliding, full = (_visible(seen[i][2]["attention_mask"])[:, 0] for i in (0, 1))
    b, first_image = 0, torch.nonzero(inputs.visual_mask[0]).squeeze(-1)[:16]
    last_text = int(torch.nonzero(~inputs.visual_mask[b] & inputs["attention_mask"][b].bool())[-1])
    # A late text query sees none of the first image in a sliding layer, all of it in a global one.
    assert not sliding[b, last_text, first_image].any() and full[b, last_text, first_image].all()
    # Image tokens attend to later tokens of their own image (bidirectional): the part a frozen layer drops.
    assert full[b, first_image[0], first_image[-1]]

    fast, reference, baseline = fast_and_reference(model, inputs, [0, 1, 2])  # sliding, global, sliding
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)
    assert (fast - baseline).abs().max() > 1e-3
    wide = build_model("gemma3", attn, init_std=0.2, text_overrides={"sliding_window": 512})
    assert (run(wide, inputs)[inputs["attention_mask"].bool()] - baseline).abs().max() > 1e-3  # the cut matters


def test_gemma3_generate_with_sliding_window_cache():
    model = build_model("gemma3", init_std=0.2)
    inputs = build_inputs(model, "gemma3")

    def generate():
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=12, do_sample=False)  # decoding past the window

    apply_shortv(model, ShortVConfig([0, 1], mode="reference"))
    reference = generate()
    apply_shortv(model, [0, 1])
    fast = generate()
    with disable_shortv(model):
        baseline = generate()
    remove_shortv(model)
    assert torch.equal(fast, reference) and fast.shape == baseline.shape


def test_mistral3_break_and_end_tokens_are_text_and_get_updated():
    model = build_model("mistral3", init_std=0.2)
    inputs = build_inputs(model, "mistral3")
    ids = inputs["input_ids"]
    markers = (ids == ROW_BREAK_ID) | (ids == VISION_END_ID)
    assert markers.any() and not (markers & inputs.visual_mask).any()
    apply_shortv(model, [1])
    try:
        seen = layer_io(model, inputs, [1])
    finally:
        remove_shortv(model)
    layer_in, layer_out, _ = seen[1]
    assert torch.equal(layer_out[inputs.visual_mask], layer_in[inputs.visual_mask])
    assert (layer_out[markers] - layer_in[markers]).abs().amax(-1).min() > 0  # every marker token moves


def test_glm4v_video_batch():
    model = build_model("glm4v", init_std=0.2)
    layouts = [dict(videos=1), dict(n_text_before=6, n_text_after=3), dict(n_text_before=2, videos=1)]
    inputs = build_inputs(model, "glm4v", batch_layouts=layouts)
    assert inputs.video_mask.any() and not inputs.image_mask.any()
    fast, reference, baseline = fast_and_reference(model, inputs, [1, 2])
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)
    assert (fast - baseline).abs().max() > 1e-3
    with pytest.raises(ValueError, match="cannot take images and videos in one batch"):
        build_inputs(model, "glm4v", batch_layouts=[dict(images=1), dict(videos=1)])


def test_every_verified_language_model_has_an_anatomy_and_every_family_gets_its_fast_layer():
    for name, arch in ARCHITECTURES.items():
        missing = [text for text in arch.fast_text_model_types if text not in LANGUAGE_MODELS]
        assert not missing, (name, missing)
    for family in FAMILIES:
        model = build_model(family)
        fast = fast_layer_for(model)
        assert fast is not None, family
        assert all(fast.unsupported_reason(layer) is None for layer in find_decoder_layers(model)), family
    assert {fast_layer_for(build_model(f)).anatomy.module for f in ("gemma3", "glm4v", "qwen3_vl", "llava")} == {
        "sandwich", "prenorm"}


def test_layer_that_does_not_match_its_anatomy_is_refused():
    model = build_model("qwen3_vl")
    attention = find_decoder_layers(model)[2].self_attn
    q_norm = attention.q_norm
    del attention.q_norm
    try:
        with pytest.raises(ValueError, match=r"decoder layer 2: .* expected layer anatomy \(missing self_attn.q_norm\)"):
            apply_shortv(model, [1, 2])
        apply_shortv(model, ShortVConfig([1, 2], mode="reference"))  # reference works on any layer
        remove_shortv(model)
    finally:
        attention.q_norm = q_norm
    llava = build_model("llava")
    find_decoder_layers(llava)[0].self_attn.q_norm = torch.nn.Identity()
    with pytest.raises(ValueError, match="norms its queries/keys, which its registered anatomy does not describe"):
        apply_shortv(llava, [0])


@pytest.mark.parametrize("family", ["gemma3", "qwen3_vl_moe", "smolvlm"])
def test_unsupported_attention_backend_names_the_supported_ones(family):
    model = build_model(family)
    model.set_attn_implementation("flex_attention")
    with pytest.raises(ValueError, match="attn_implementation='flex_attention' is not supported .* sdpa, eager"):
        apply_shortv(model, [1])


def test_unverified_language_model_is_refused():
    import transformers as tf

    from tiny_models.base import IMAGE_TOKEN_ID, text_config

    config = tf.Mistral3Config(vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=1, num_attention_heads=2, head_dim=16),
                               text_config=text_config("qwen2", {}), image_token_index=IMAGE_TOKEN_ID)
    model = tf.Mistral3ForConditionalGeneration(config).eval()
    with pytest.raises(ValueError, match="verified with language models mistral, ministral3, not 'qwen2'"):
        apply_shortv(model, [1])



@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3_vl_moe"])
def test_chunk_without_text_tokens(family):
    """A forward whose tokens are all visual (e.g. a decode step on a generated placeholder id) skips the queries,
    attention and MLP entirely, keeps the KV-cache update, and equals the reference."""
    from shortv import using_visual_mask

    model = build_model(family, init_std=0.2)
    inputs = build_inputs(model, family, batch_layouts=[dict(n_text_before=2, images=1), dict(images=1)])
    everything = torch.ones_like(inputs["input_ids"], dtype=torch.bool)
    logits = []
    for mode in ("reference", "fast"):
        apply_shortv(model, ShortVConfig([1, 2], mode=mode))
        with using_visual_mask(model, everything):
            logits.append(run(model, inputs))
    remove_shortv(model)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-5)
