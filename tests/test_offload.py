"""ShortV and LC on a model spread by accelerate's device_map, with layers offloaded to CPU and disk."""

import pytest
import torch
from tiny_models import build_inputs, build_model, default_layouts
from transformers import LlavaForConditionalGeneration

from shortv import CalibrationSample, ShortVConfig, apply_shortv, layer_contribution, remove_shortv

FROZEN = [1, 2]
# Frozen layer 1 and the LM head live on disk, frozen layer 2 and the rest in CPU memory.
DEVICE_MAP = {
    "model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "model.language_model.embed_tokens": "cpu",
    "model.language_model.layers.0": "cpu", "model.language_model.layers.1": "disk",
    "model.language_model.layers.2": "cpu", "model.language_model.layers.3": "disk",
    "model.language_model.norm": "cpu", "model.language_model.rotary_emb": "cpu", "lm_head": "disk",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    model = build_model("llava", init_std=0.2)
    model.save_pretrained(folder)
    offloaded = LlavaForConditionalGeneration.from_pretrained(
        folder, device_map=DEVICE_MAP, offload_folder=folder / "offload", attn_implementation="sdpa"
    ).eval()
    assert offloaded.model.language_model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    inputs = build_inputs(model, "llava", batch_layouts=default_layouts("llava"))
    return model, offloaded, inputs


def test_offloaded_fast_shortv_equals_in_memory_reference(models):
    model, offloaded, inputs = models
    with torch.no_grad():
        baseline = offloaded(**inputs).logits
        apply_shortv(model, ShortVConfig(FROZEN, mode="reference"))
        reference = model(**inputs).logits
        reference_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        apply_shortv(offloaded, FROZEN)
        fast = offloaded(**inputs).logits
        fast_tokens = offloaded.generate(**inputs, max_new_tokens=4, do_sample=False)
    remove_shortv(model)
    remove_shortv(offloaded)
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(fast[keep], reference[keep], rtol=0, atol=1e-5)
    assert (fast[keep] - baseline[keep]).abs().max() > 1e-2
    assert torch.equal(fast_tokens, reference_tokens)
    with torch.no_grad():
        assert torch.equal(offloaded(**inputs).logits, baseline)  # removed: bit-identical again


def test_offloaded_lc_equals_single_device_lc(models):
    model, offloaded, inputs = models
    samples = [CalibrationSample(id=f"sample-{index}", inputs=dict(inputs.sample(index))) for index in range(2)]
    expected = layer_contribution(model, samples, progress=False)
    got = layer_contribution(offloaded, samples, progress=False)
    for token_type in ("visual", "text"):
        torch.testing.assert_close(torch.tensor(got.per_sample[token_type]),
                                   torch.tensor(expected.per_sample[token_type]), rtol=1e-5, atol=1e-7)
    assert got.order == expected.order and max(expected.mean["visual"]) > 0
