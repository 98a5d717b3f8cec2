"""Fast operator-level frozen layers == the reference, on every family with a fast path; the rows each projection
sees are counted."""

import pytest
import torch
from row_counts import rows_fed
from tiny_models import FAMILIES, SPECS, TEXT_ONLY_FAMILIES, build_inputs, build_model, default_layouts, reset_state

from shortv import ShortVConfig, apply_shortv, remove_shortv
from shortv.registry import LANGUAGE_MODELS, find_decoder_layers

# Each operator in a layer that feeds a frozen one and in one that feeds an unfrozen one, and both in the last layer;
# in the hybrid models (linear, full, linear, full attention) each operator in a linear-attention and in a
# full-attention layer; in Gemma 4 (sliding, full, sliding, full) in both kinds, and in the last layer, which reuses
# layer 1's keys and values.
CONFIGS = [dict(attention_layers=[1], mlp_layers=[2, 3]), dict(attention_layers=[2, 3], mlp_layers=[1], layers=[0])]
# The parts of a layer whose rows are counted: those an operator-level layer runs on text rows only, by the operator
# whose update its visual rows skip. Every other counted part runs on every row (keys, values, a linear-attention
# mixer's input half, Gemma 4's per-layer-input gate, and the other operator).
TEXT_ROWS = {"attention": ("self_attn.q_proj", "self_attn.o_proj", "linear_attn.in_proj_z", "linear_attn.out_proj"),
             "mlp": ("mlp", "experts", "router")}
ALL_ROWS = ("self_attn.k_proj", "self_attn.v_proj", "linear_attn.in_proj_qkv", "per_layer_input_gate")


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


def test_every_fast_language_model_is_among_the_families():
    """The families parametrizing these tests run every language model with a fast layer (registry, by the
    ``model_type`` of the text config): a fast path added without a tiny family fails here."""
    covered = {SPECS[family].make_config({}).get_text_config().model_type for family in FAMILIES}
    assert set(LANGUAGE_MODELS) <= covered, sorted(set(LANGUAGE_MODELS) - covered)


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, device):
    # In float64, where fast and reference agree to 1e-12: in float32 a single sample differs by up to 1.4e-5 in
    # the logits here, as much as whole ShortV layers do on it (the text queries' attention rounds differently).
    model = build_model(request.param, attn_implementation="sdpa", init_std=0.2).to(device, torch.float64)
    if any(name.endswith(".experts") for name, _ in model.named_modules()):
        model.set_experts_implementation("eager")  # grouped-mm experts take no float64
    # mixed layouts and left padding: the per-sample route; a single sample: the shared one
    batch = build_inputs(model, request.param, batch_layouts=default_layouts(request.param), padding_side="left")
    return model, [_double(batch, device), _double(batch.sample(0), device)]


def counted_parts(model, fields):
    """(layer, part) -> the module, for every counted part of the operator-level layers in ``fields``."""
    layers = find_decoder_layers(model)
    parts = {}
    for field in ("attention_layers", "mlp_layers"):
        for index in fields.get(field, []):
            modules = dict(layers[index].named_modules())
            parts |= {(index, name): modules[name] for name in (*TEXT_ROWS["attention"], *TEXT_ROWS["mlp"], *ALL_ROWS)
                      if isinstance(modules.get(name), torch.nn.Module)}
    return parts


def expected_rows(fields, parts, n_text, n_tokens):  # parts: (layer, name) pairs
    """Attention-only: queries / o_proj (a linear-attention mixer's output half) see the text rows, keys and values
    and the MLP every row; MLP-only: the reverse."""
    expected = {}
    for operator in ("attention", "mlp"):
        for index in fields.get(f"{operator}_layers", []):
            expected |= {(layer, name): n_text if name in TEXT_ROWS[operator] else n_tokens
                         for layer, name in parts if layer == index}
    return expected


@pytest.mark.parametrize("fields", CONFIGS)
def test_fast_operator_layers_match_reference(tiny, fields):
    model, batches = tiny
    parts = counted_parts(model, fields)
    for inputs in batches:
        baseline = run(model, inputs)
        outputs = {}
        for mode in ("reference", "fast"):
            apply_shortv(model, ShortVConfig(mode=mode, **fields))
            try:
                with rows_fed(parts) as rows:
                    outputs[mode] = run(model, inputs)
            finally:
                remove_shortv(model)
        apply_shortv(model, ShortVConfig(sorted({*fields.get("layers", []), 1, 2, 3})))  # the same layers, whole
        whole = run(model, inputs)
        remove_shortv(model)
        keep = inputs["attention_mask"].bool()
        torch.testing.assert_close(outputs["fast"][keep], outputs["reference"][keep], rtol=0, atol=1e-10)
        text = keep & ~inputs.visual_mask
        assert (outputs["fast"][text] - baseline[text]).abs().max() > 1e-3
        assert (outputs["fast"][text] - whole[text]).abs().max() > 1e-3
        # the rows the fast run fed each part (of the last call: the prefill)
        n_tokens = inputs["input_ids"].numel()
        n_text = n_tokens - int(inputs.visual_mask.sum())
        assert rows == expected_rows(fields, rows, n_text, n_tokens) and n_text < n_tokens
        for operator, other in (("attention", "mlp"), ("mlp", "attention")):  # each layer's two operators counted
            for index in fields.get(f"{operator}_layers", []):
                assert any(rows.get((index, name)) == n_text for name in TEXT_ROWS[operator]), (index, rows)
                assert any(rows.get((index, name)) == n_tokens for name in TEXT_ROWS[other]), (index, rows)


@pytest.mark.parametrize("family", ["llava", "gemma4"])  # Gemma 4: decode steps read layer 1's shared keys/values
def test_generate_fast_equals_reference_with_kv_cache(family):
    model = build_model(family, init_std=0.2)
    inputs = build_inputs(model, family, batch_layouts=default_layouts(family), padding_side="left")
    tokens = {}
    for mode in ("reference", "fast"):
        apply_shortv(model, ShortVConfig(attention_layers=[1, 3], mlp_layers=[2], mode=mode))
        try:
            with torch.no_grad():
                tokens[mode] = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        finally:
            remove_shortv(model)
    assert torch.equal(tokens["fast"], tokens["reference"])
