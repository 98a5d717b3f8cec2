"""Fast operator-level frozen layers == the reference, on every family with a fast path; the rows each projection
sees are counted."""

import pytest
import torch
from tiny_models import FAMILIES, TEXT_ONLY_FAMILIES, build_inputs, build_model, default_layouts, reset_state

from shortv import ShortVConfig, apply_shortv, remove_shortv
from shortv.registry import find_decoder_layers

# Gemma 4's layers have a per-layer-input branch and an output scale: operator-level freezing refuses them.
OPERATOR_FAMILIES = [family for family in FAMILIES if family != "gemma4"]
# Each operator in a layer that feeds a frozen one and in one that feeds an unfrozen one; in the hybrid models
# (linear, full, linear, full attention) each operator once in a linear-attention and once in a full-attention layer.
CONFIGS = [dict(attention_layers=[1], mlp_layers=[2]), dict(attention_layers=[2], mlp_layers=[1], layers=[0])]


def run(model, inputs):
    reset_state(model)
    extra = {"visual_mask": inputs.visual_mask} if inputs.family in TEXT_ONLY_FAMILIES else {}
    with torch.no_grad():
        return model(**inputs, **extra).logits


def _double(inputs, device):
    inputs = inputs.to(device)
    for key, value in inputs.items():
        if torch.is_tensor(value) and value.is_floating_point():
            inputs[key] = value.double()
    return inputs


@pytest.fixture(scope="module", params=OPERATOR_FAMILIES)
def tiny(request, device):
    # In float64, where fast and reference agree to 1e-12: in float32 a single sample differs by up to 1.4e-5 in
    # the logits here, as much as whole ShortV layers do on it (the text queries' attention rounds differently).
    model = build_model(request.param, attn_implementation="sdpa", init_std=0.2).to(device, torch.float64)
    if "moe" in request.param:
        model.set_experts_implementation("eager")  # grouped-mm experts take no float64
    # mixed layouts and left padding: the per-sample route; a single sample: the shared one
    batch = build_inputs(model, request.param, batch_layouts=default_layouts(request.param), padding_side="left")
    return model, [_double(batch, device), _double(batch.sample(0), device)]


@pytest.mark.parametrize("fields", CONFIGS)
def test_fast_operator_layers_match_reference(tiny, fields):
    model, batches = tiny
    for inputs in batches:
        baseline = run(model, inputs)
        outputs = {}
        for mode in ("reference", "fast"):
            apply_shortv(model, ShortVConfig(mode=mode, **fields))
            try:
                outputs[mode] = run(model, inputs)
            finally:
                remove_shortv(model)
        apply_shortv(model, ShortVConfig(sorted({*fields.get("layers", []), 1, 2})))  # the same layers, whole
        whole = run(model, inputs)
        remove_shortv(model)
        keep = inputs["attention_mask"].bool()
        torch.testing.assert_close(outputs["fast"][keep], outputs["reference"][keep], rtol=0, atol=1e-10)
        text = keep & ~inputs.visual_mask
        assert (outputs["fast"][text] - baseline[text]).abs().max() > 1e-3
        assert (outputs["fast"][text] - whole[text]).abs().max() > 1e-3


ROWS = {  # modules whose input rows are counted, by layer kind: (rows-skipping with attention, with the MLP)
    "self_attn": (("self_attn.q_proj", "self_attn.o_proj"), ("mlp",)),
    "linear_attn": (("linear_attn.in_proj_z", "linear_attn.out_proj"), ("mlp",)),
}
ALL_ROWS = {"self_attn": ("self_attn.k_proj", "self_attn.v_proj"), "linear_attn": ("linear_attn.in_proj_qkv",)}


@pytest.mark.parametrize("family", ["llava", "gemma3", "qwen3_5", "qwen3_vl_moe"])
def test_rows_each_projection_sees(family):
    """Attention-only: queries / o_proj (a linear-attention mixer's output half) see the text rows, keys and values
    and the MLP every row; MLP-only: the reverse."""
    model = build_model(family, init_std=0.2)
    inputs = build_inputs(model, family, batch_layouts=default_layouts(family), padding_side="left")
    n_tokens = inputs["input_ids"].numel()
    n_text = n_tokens - int(inputs.visual_mask.sum())
    layers = find_decoder_layers(model)
    for attention_layer, mlp_layer in ((1, 2), (2, 1)):
        rows, handles = {}, []
        counted = {name for kind, (skip_attention, skip_mlp) in ROWS.items()
                   for name in (*skip_attention, *skip_mlp, *ALL_ROWS[kind])}
        for index in (attention_layer, mlp_layer):
            for name, module in layers[index].named_modules():
                if name in counted:
                    handles.append(module.register_forward_pre_hook(
                        lambda m, a, k, key=(index, name): rows.__setitem__(key, (a[0] if a else k["hidden_states"])
                                                                             .shape[:-1].numel()), with_kwargs=True))
        apply_shortv(model, ShortVConfig(attention_layers=[attention_layer], mlp_layers=[mlp_layer]))
        try:
            run(model, inputs)
        finally:
            remove_shortv(model)
            for handle in handles:
                handle.remove()
        for index, frozen in ((attention_layer, 0), (mlp_layer, 1)):
            kind = "linear_attn" if hasattr(layers[index], "linear_attn") else "self_attn"
            skipping = ROWS[kind][frozen]
            running = ROWS[kind][1 - frozen] + ALL_ROWS[kind]
            seen = {name: count for (layer, name), count in rows.items() if layer == index}
            assert {name: seen[name] for name in skipping} == {name: n_text for name in skipping}, (index, seen)
            assert {name: seen[name] for name in running} == {name: n_tokens for name in running}, (index, seen)
    assert n_text < n_tokens


def test_generate_fast_equals_reference_with_kv_cache():
    model = build_model("llava", init_std=0.2)
    inputs = build_inputs(model, "llava", batch_layouts=default_layouts("llava"), padding_side="left")
    tokens = {}
    for mode in ("reference", "fast"):
        apply_shortv(model, ShortVConfig(attention_layers=[1], mlp_layers=[2], mode=mode))
        try:
            with torch.no_grad():
                tokens[mode] = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        finally:
            remove_shortv(model)
    assert torch.equal(tokens["fast"], tokens["reference"])


def test_gemma4_operator_layers_are_refused_in_both_modes():
    model = build_model("gemma4", init_std=0.2)
    for mode in ("fast", "reference"):
        with pytest.raises(ValueError, match="per-layer-input branch"):
            apply_shortv(model, ShortVConfig(mlp_layers=[0], mode=mode))
    assert "forward" not in find_decoder_layers(model)[0].__dict__
