"""Bad input gets a clear message, and a failed call leaves the model exactly as it was."""

import pytest
import torch
from tiny_models import build_inputs, build_model, default_layouts
from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3Config, Phi3ForCausalLM

from shortv import ShortVConfig, apply_shortv, disable_shortv, get_shortv_state, remove_shortv, using_visual_mask


@pytest.fixture(scope="module")
def llama():
    model = build_model("llama", init_std=0.2)
    inputs = build_inputs(model, "llama", batch_layouts=default_layouts("llama", batch_size=2))
    return model, inputs


def logits(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def test_out_of_range_layer_names_valid_range_and_keeps_previous_patch(llama):
    model, inputs = llama
    apply_shortv(model, [1])
    with_one = logits(model, inputs, visual_mask=inputs.visual_mask)
    with pytest.raises(ValueError, match=r"layer index 4 is out of range: .* has 4 decoder layers, valid indices are 0\.\.3"):
        apply_shortv(model, [0, 4])
    assert get_shortv_state(model).config.layers == [1]
    assert torch.equal(logits(model, inputs, visual_mask=inputs.visual_mask), with_one)
    remove_shortv(model)


def test_bad_config_argument(llama):
    model, _ = llama
    with pytest.raises(TypeError, match="expects a ShortVConfig or a list of layer indices"):
        apply_shortv(model, "1,2")
    with pytest.raises(ValueError, match="lists layer 2 more than once"):
        apply_shortv(model, [2, 2])
    assert get_shortv_state(model) is None


@pytest.mark.parametrize(
    ("make_mask", "error", "message"),
    [
        (lambda m: m[:, :-1], ValueError, r"visual_mask has shape \(2, \d+\) but the input has shape \(2, \d+\)"),
        (lambda m: m[:1], ValueError, "visual_mask has shape"),
        (lambda m: m.float(), TypeError, "visual_mask must be boolean"),
        (lambda m: m.tolist(), TypeError, "visual_mask must be a torch.Tensor"),
    ],
)
def test_bad_visual_mask(llama, make_mask, error, message):
    model, inputs = llama
    apply_shortv(model, [1, 2])
    try:
        with pytest.raises(error, match=message):
            logits(model, inputs, visual_mask=make_mask(inputs.visual_mask))
    finally:
        remove_shortv(model)


def test_integer_mask_and_context_manager_match_bool_kwarg(llama):
    model, inputs = llama
    apply_shortv(model, [1, 2])
    try:
        expected = logits(model, inputs, visual_mask=inputs.visual_mask)
        assert torch.equal(logits(model, inputs, visual_mask=inputs.visual_mask.long()), expected)
        with using_visual_mask(model, inputs.visual_mask):
            assert torch.equal(logits(model, inputs), expected)
    finally:
        remove_shortv(model)


def test_no_mask_means_no_visual_tokens(llama):
    model, inputs = llama
    baseline = logits(model, inputs)
    apply_shortv(model, [1, 2])
    try:
        assert torch.equal(logits(model, inputs), baseline)
    finally:
        remove_shortv(model)


def test_inputs_embeds_need_explicit_mask(llama):
    model, inputs = llama
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    apply_shortv(model, [1, 2])
    try:
        by_ids = logits(model, inputs, visual_mask=inputs.visual_mask)
        with torch.no_grad():
            by_embeds = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], visual_mask=inputs.visual_mask)
        torch.testing.assert_close(by_embeds.logits, by_ids, rtol=0, atol=1e-6)
        with pytest.raises(RuntimeError, match="cannot tell which positions of this forward are visual"), torch.no_grad():
            model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
        # the failed forward left nothing behind
        torch.testing.assert_close(logits(model, inputs, visual_mask=inputs.visual_mask), by_ids, rtol=0, atol=0)
    finally:
        remove_shortv(model)


def test_unsupported_attention_backend(llama):
    model, _ = llama
    model.set_attn_implementation("flex_attention")
    try:
        with pytest.raises(ValueError, match="attn_implementation='flex_attention' is not supported .* sdpa, eager"):
            apply_shortv(model, [1])
        assert get_shortv_state(model) is None
        apply_shortv(model, ShortVConfig([1], mode="reference"))  # reference works with any backend
        remove_shortv(model)
    finally:
        model.set_attn_implementation("sdpa")


def tiny_phi3():
    torch.manual_seed(0)
    config = Phi3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2,
    )
    return Phi3ForCausalLM(config).eval()


def test_unknown_family_fast_lists_supported_and_reference_works():
    model = tiny_phi3()
    with pytest.raises(ValueError, match=r"mode='fast' does not support model_type='phi3'; supported: .*llava.*qwen2_vl") as info:
        apply_shortv(model, [1])
    assert "mode='reference' works with any decoder" in str(info.value)

    ids = torch.randint(3, 64, (2, 10))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, 2:6] = True
    with torch.no_grad():
        baseline = model(ids).logits
        apply_shortv(model, ShortVConfig([0, 1], mode="reference"))
        frozen = model(ids, visual_mask=mask).logits
        with disable_shortv(model):
            assert torch.equal(model(ids).logits, baseline)
    remove_shortv(model)
    assert (frozen[:, 6:] - baseline[:, 6:]).abs().max() > 1e-3
    torch.testing.assert_close(frozen[:, :2], baseline[:, :2], rtol=0, atol=0)  # before the image: untouched


def test_model_without_decoder_layers():
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=8, patch_size=4))
    with pytest.raises(ValueError, match="could not find the decoder layers of CLIPVisionModel"):
        apply_shortv(model, [0])
    assert get_shortv_state(model) is None


def test_context_managers_need_shortv(llama):
    model, inputs = llama
    with pytest.raises(ValueError, match="no ShortV applied"):
        with disable_shortv(model):
            pass
    with pytest.raises(ValueError, match="no ShortV applied"):
        with using_visual_mask(model, inputs.visual_mask):
            pass
