"""Operator-level freezing (reference mode): visual rows skip a layer's attention update, its MLP update, or both."""

import json

import pytest
import torch
from tiny_models import build_inputs, build_model, reset_state

from shortv import ShortVConfig, apply_shortv, remove_shortv
from shortv.registry import find_decoder_layers

# The residual structure of each family's layers, written out here independently of shortv's registry:
# (attention module per layer type, attention output norm, MLP input norm, MLP, MLP output norm).
STRUCTURES = {
    "llava": ({None: "self_attn"}, None, "post_attention_layernorm", "mlp", None),  # pre-norm (Llama)
    "qwen3_vl_moe": ({None: "self_attn"}, None, "post_attention_layernorm", "mlp", None),  # pre-norm, MoE MLP
    "gemma3": ({None: "self_attn"}, "post_attention_layernorm", "pre_feedforward_layernorm", "mlp",
               "post_feedforward_layernorm"),  # sandwich
    "glm4v": ({None: "self_attn"}, "post_self_attn_layernorm", "post_attention_layernorm", "mlp",
              "post_mlp_layernorm"),  # sandwich, other names
    "qwen3_5": ({"linear_attention": "linear_attn", "full_attention": "self_attn"}, None,
                "post_attention_layernorm", "mlp", None),  # linear attention / full attention layers
    "gemma4": ({None: "self_attn"}, "post_attention_layernorm", "pre_feedforward_layernorm", "mlp",
               "post_feedforward_layernorm"),  # sandwich, + parallel MoE, per-layer input, layer scalar (_gemma4_slot)
}


def _gemma4_mlp_slot(layer, h):
    """Gemma 4's MLP slot before its output norm: dense MLP beside a MoE routed from the raw residual stream."""
    flat = h.reshape(-1, h.shape[-1])
    _, weights, experts = layer.router(flat)
    routed = layer.experts(layer.pre_feedforward_layernorm_2(flat), experts, weights).reshape(h.shape)
    dense = layer.mlp(layer.pre_feedforward_layernorm(h))
    return layer.post_feedforward_layernorm_1(dense) + layer.post_feedforward_layernorm_2(routed)


def _gemma4_after_branches(layer, h, per_layer_input):
    """What belongs to neither operator and applies to every row: the per-layer-input branch, then the layer scalar."""
    gated = layer.act_fn(layer.per_layer_input_gate(h)) * per_layer_input
    return (h + layer.post_per_layer_input_norm(layer.per_layer_projection(gated))) * layer.layer_scalar


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _run_capturing(model, inputs, layer, attention_name):
    """(layer input, layer output, attention-branch output, logits, the layer's per-layer input or None) of ``layer``
    in one forward."""
    seen = {}

    def keep(key, value):  # the first call only; returns None, so no hook changes anything
        seen.setdefault(key, value)

    def inputs_of(module, args, kwargs):
        keep("x", args[0] if args else kwargs["hidden_states"])
        keep("p", args[1] if len(args) > 1 else kwargs.get("per_layer_input"))

    handles = [
        layer.register_forward_pre_hook(inputs_of, with_kwargs=True),
        layer.register_forward_hook(lambda m, a, o: keep("y", _first(o))),
        getattr(layer, attention_name).register_forward_hook(lambda m, a, o: keep("a", _first(o))),
    ]
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    return seen["x"], seen["y"], seen["a"], logits, seen["p"]


def _oracle(layer, structure, x, attention_out, y, visual, operator, per_layer_input=None):
    """Naive layer math: text rows as unpatched; visual rows without the ``operator`` branch (Gemma 4: with its
    per-layer-input branch and layer scalar, which belong to neither operator)."""
    _, attention_norm, mlp_norm, mlp, mlp_out_norm = structure
    gemma4 = hasattr(layer, "layer_scalar")

    def maybe(name, value):
        return getattr(layer, name)(value) if name else value

    def mlp_slot(h):
        return _gemma4_mlp_slot(layer, h) if gemma4 else _first(getattr(layer, mlp)(getattr(layer, mlp_norm)(h)))

    with torch.no_grad():
        after_attention = x + maybe(attention_norm, attention_out)
        if operator == "attention":  # visual rows enter the MLP as they entered the layer
            visual_rows = x + maybe(mlp_out_norm, mlp_slot(x))
        else:  # visual rows keep their post-attention state
            visual_rows = after_attention
        if gemma4:
            visual_rows = _gemma4_after_branches(layer, visual_rows, per_layer_input)
    return torch.where(visual.unsqueeze(-1), visual_rows, y)


@pytest.mark.parametrize("family", list(STRUCTURES))
@pytest.mark.parametrize("operator", ["attention", "mlp"])
def test_reference_operator_freeze_matches_naive_layer_math(family, operator):
    model = build_model(family, init_std=0.2)
    inputs = build_inputs(model, family, batch_layouts=[dict(n_text_before=3, images=1, n_text_after=4),
                                                        dict(n_text_before=2, images=1, n_text_after=6)])
    layers = find_decoder_layers(model)
    structure = STRUCTURES[family]
    moved = 0
    for index in range(len(layers) - 1):
        layer = layers[index]
        kinds = structure[0]
        attention_name = kinds[None] if None in kinds else kinds[model.config.get_text_config().layer_types[index]]
        reset_state(model)
        x, y, attention_out, plain_logits, per_layer_input = _run_capturing(model, inputs, layer, attention_name)
        field = {"attention": "attention_layers", "mlp": "mlp_layers"}[operator]
        apply_shortv(model, ShortVConfig(mode="reference", **{field: [index]}))
        try:
            reset_state(model)
            x_frozen, y_frozen, _, logits, _ = _run_capturing(model, inputs, layer, attention_name)
        finally:
            remove_shortv(model)
        torch.testing.assert_close(x_frozen, x, rtol=0, atol=0)  # layers before it are untouched
        expected = _oracle(layer, structure, x, attention_out, y, inputs.visual_mask, operator,
                           per_layer_input)
        torch.testing.assert_close(y_frozen, expected, rtol=1e-5, atol=1e-5)
        # Non-trivial: the visual rows moved against the unpatched layer and against a whole frozen (ShortV) layer
        # (the tiny Gemma 3's projector is zero-initialised: its image rows enter layer 0 as zeros, which no MLP moves).
        visual = inputs.visual_mask
        assert (y_frozen[visual] - y[visual]).abs().max() > 1e-3
        assert (logits - plain_logits).abs().max() > 1e-5
        moved += bool((y_frozen[visual] - x[visual]).abs().max() > 1e-3)
    assert moved >= len(layers) - 2


def test_both_operators_of_a_layer_is_the_shortv_layer():
    model = build_model("llava", init_std=0.2)
    inputs = build_inputs(model, "llava", batch_layouts=[dict(n_text_before=3, images=1, n_text_after=4)])
    layers = find_decoder_layers(model)
    x, y, *_ = _run_capturing(model, inputs, layers[1], "self_attn")
    apply_shortv(model, ShortVConfig([1], mode="reference"))
    _, y_shortv, _, logits_shortv, _ = _run_capturing(model, inputs, layers[1], "self_attn")
    remove_shortv(model)
    torch.testing.assert_close(y_shortv[inputs.visual_mask], x[inputs.visual_mask], rtol=0, atol=0)
    # attention-only in layer 1 and MLP-only in layer 2 together: each layer as when frozen alone
    apply_shortv(model, ShortVConfig(attention_layers=[1], mlp_layers=[2], mode="reference"))
    _, y_mixed, _, logits_mixed, _ = _run_capturing(model, inputs, layers[1], "self_attn")
    remove_shortv(model)
    apply_shortv(model, ShortVConfig(attention_layers=[1], mode="reference"))
    _, y_alone, *_ = _run_capturing(model, inputs, layers[1], "self_attn")
    remove_shortv(model)
    torch.testing.assert_close(y_mixed, y_alone, rtol=0, atol=0)
    assert (logits_mixed - logits_shortv).abs().max() > 1e-5
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, _run_capturing(model, inputs, layers[1], "self_attn")[3])


def test_config_json_round_trip_and_old_configs(tmp_path):
    config = ShortVConfig(layers=[3], attention_layers=[0, 2], mlp_layers=[1], mode="reference")
    assert config.frozen_operators == {3: {"attention", "mlp"}, 0: {"attention"}, 2: {"attention"}, 1: {"mlp"}}
    assert config.operator_level and config.frozen_layers == {3}
    loaded = ShortVConfig.load(config.save(tmp_path / "ops.json"))
    assert loaded == config
    # a layer-level config keeps the old JSON form, and an old file (no operator fields) loads
    plain = ShortVConfig(layers=[1, 2])
    assert set(plain.to_dict()) == {"layers", "mode", "frozen_tokens", "version", "provenance"}
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"layers": [1], "mode": "fast", "version": 1}))
    assert ShortVConfig.load(old) == ShortVConfig(layers=[1]) and not ShortVConfig.load(old).operator_level


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": [1], "attention_layers": [1], "mode": "reference"},
         "layer 1 is in both layers and attention_layers"),
        ({"attention_layers": [2], "mlp_layers": [2], "mode": "reference"},
         "layer 2 is in both attention_layers and mlp_layers (list it in `layers` to skip both updates)"),
        ({"mlp_layers": [1, 1], "mode": "reference"}, "mlp_layers lists layer 1 more than once"),
        ({"attention_layers": [-2], "mode": "reference"}, "attention_layers must be >= 0"),
        ({"mlp_layers": [1], "mode": "reference", "frozen_tokens": "text"}, "freezes visual tokens only"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError) as excinfo:
        ShortVConfig(**kwargs)
    assert message in str(excinfo.value)


def test_mlp_layers_must_be_integers():
    with pytest.raises(TypeError, match="ShortVConfig.mlp_layers must contain integers"):
        ShortVConfig(mlp_layers=[1.5], mode="reference")


def test_refused_layers_leave_the_model_untouched():
    model = build_model("llava", init_std=0.2)
    with pytest.raises(ValueError, match="layer index 9 is out of range"):
        apply_shortv(model, ShortVConfig(mlp_layers=[9], mode="reference"))
    assert not hasattr(model, "_shortv_state")
    assert "forward" not in find_decoder_layers(model)[0].__dict__
