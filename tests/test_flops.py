"""FLOPs model against the paper's published totals, plus the shape-model builder."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlavaConfig, Qwen2VLConfig

from shortv.flops import (
    PAPER_SHAPES,
    LayerDims,
    flops_ratio,
    get_shape,
    ideal_speedup,
    layer_flops,
    model_flops,
    shape_names,
)
from shortv.benchmark.shapes import ShapeInputs, build_shape_model, make_token_layout, shape_config

TFLOPS = 1e12
TEXT_TOKENS = 64  # the paper's FLOPs table assumes 64 text tokens

# (shape, frozen layer count N, vanilla TFLOPs, ShortV TFLOPs) as published.
PAPER_TABLE = [
    ("llava-1.5-7b", 19, 8.50, 4.7),
    ("llava-1.5-13b", 24, 16.58, 9.1),
    ("next-7b", 19, 42.67, 21.6),
    ("next-13b", 24, 81.81, 41.0),
]


def _gqa(dims: LayerDims, kv_heads: int) -> LayerDims:
    return dataclasses.replace(dims, num_key_value_heads=kv_heads)


def _layers(dims: LayerDims, num_layers: int) -> LayerDims:
    return dataclasses.replace(dims, num_layers=num_layers)


@pytest.mark.parametrize(("name", "n_frozen", "vanilla", "shortv"), PAPER_TABLE)
def test_paper_totals_reproduced(name: str, n_frozen: int, vanilla: float, shortv: float) -> None:
    # The formula reproduces every published digit: vanilla totals are within
    # half a unit of the 2nd decimal (max error 0.0048), ShortV totals within
    # half a unit of the 1st decimal (max error 0.040, on LLaVA-NeXT-7B).
    shape = get_shape(name)
    dense = model_flops(shape.dims, TEXT_TOKENS, shape.visual_tokens) / TFLOPS
    frozen = model_flops(shape.dims, TEXT_TOKENS, shape.visual_tokens, range(n_frozen)) / TFLOPS
    assert abs(dense - vanilla) < 0.005
    assert abs(frozen - shortv) < 0.05


def test_paper_shapes_catalogue() -> None:
    assert shape_names() == sorted(PAPER_SHAPES)
    expected = {"llava-1.5-7b", "llava-1.5-13b", "next-7b", "next-13b", "qwen2-vl-7b", "qwen3-vl-8b", "gemma3-12b",
                "qwen3.6-27b"}
    assert set(shape_names()) == expected
    assert get_shape("next-7b").dims == get_shape("llava-1.5-7b").dims
    assert get_shape("next-13b").visual_tokens == 2880
    qwen = get_shape("qwen2-vl-7b")
    assert qwen.family == "qwen2"
    dims = qwen.dims
    assert (dims.num_layers, dims.num_key_value_heads, dims.vocab_size) == (28, 4, 152064)
    with pytest.raises(ValueError, match="valid names: .*llava-1.5-7b"):
        get_shape("llava-7b")


@pytest.mark.parametrize("name", ["llava-1.5-7b", "llava-1.5-13b"])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize(("t", "v"), [(64, 576), (1, 0), (0, 5), (37, 2880)])
def test_exact_equals_paper_for_multi_head_attention(
    name: str, frozen: bool, t: int, v: int
) -> None:
    dims = get_shape(name).dims
    assert layer_flops(dims, t, v, frozen, "exact") == layer_flops(dims, t, v, frozen, "paper")


def test_gqa_reduces_only_kv_projection_flops() -> None:
    mha = get_shape("llava-1.5-7b").dims
    gqa = _gqa(mha, kv_heads=8)
    t, v, h = 64, 576, mha.hidden_size
    for frozen in (False, True):
        saved = layer_flops(mha, t, v, frozen, "exact") - layer_flops(gqa, t, v, frozen, "exact")
        # K and V shrink from h to h/4 outputs for all t+v tokens, frozen or not.
        assert saved == 2 * (t + v) * h * 2 * (h - h // 4)
    assert model_flops(gqa, t, v, formula="exact") < model_flops(mha, t, v, formula="exact")
    # The paper formula has no notion of KV heads, so it overcounts GQA models.
    qwen = get_shape("qwen2-vl-7b").dims
    assert model_flops(qwen, t, v, formula="exact") < model_flops(qwen, t, v, formula="paper")


def test_exact_uses_attention_width_not_hidden_size() -> None:
    dims = dataclasses.replace(get_shape("llava-1.5-7b").dims, head_dim=64)  # q_dim = h / 2
    full = get_shape("llava-1.5-7b").dims
    assert layer_flops(dims, 10, 20, False, "exact") < layer_flops(full, 10, 20, False, "exact")
    assert layer_flops(dims, 10, 20, False, "paper") == layer_flops(full, 10, 20, False, "paper")


@pytest.mark.parametrize("formula", ["paper", "exact"])
def test_frozen_cheaper_with_visual_tokens_and_equal_without(formula: str) -> None:
    for dims in (get_shape("llava-1.5-7b").dims, get_shape("qwen2-vl-7b").dims):
        assert layer_flops(dims, 64, 576, True, formula) < layer_flops(
            dims, 64, 576, False, formula
        )
        assert layer_flops(dims, 64, 0, True, formula) == layer_flops(dims, 64, 0, False, formula)
        all_frozen = model_flops(dims, 64, 0, range(dims.num_layers), formula)
        assert all_frozen == model_flops(dims, 64, 0, (), formula)


def test_model_flops_sums_layers_and_optional_lm_head() -> None:
    dims = get_shape("llava-1.5-7b").dims
    dense, frozen = (layer_flops(dims, 64, 576, f) for f in (False, True))
    assert model_flops(dims, 64, 576, [0, 5, 31]) == 3 * frozen + 29 * dense
    assert model_flops(dims, 64, 576, [5, 5]) == model_flops(dims, 64, 576, [5])
    head = 2 * dims.hidden_size * dims.vocab_size
    assert model_flops(dims, 64, 576, include_lm_head=True) == 32 * dense + head
    all_logits = model_flops(dims, 64, 576, include_lm_head=True, lm_head_positions=640)
    assert all_logits == 32 * dense + 640 * head


def test_ratio_and_speedup() -> None:
    shape = get_shape("next-13b")
    frozen = range(24)
    ratio = flops_ratio(shape.dims, TEXT_TOKENS, shape.visual_tokens, frozen)
    assert ratio == pytest.approx(41.037 / 81.806, abs=1e-4)  # the paper's "~50% reduction"
    speedup = ideal_speedup(shape.dims, TEXT_TOKENS, shape.visual_tokens, frozen)
    assert speedup == pytest.approx(1 / ratio)
    assert flops_ratio(shape.dims, TEXT_TOKENS, shape.visual_tokens, ()) == 1.0
    with_head = flops_ratio(
        shape.dims, TEXT_TOKENS, shape.visual_tokens, frozen, include_lm_head=True
    )
    assert ratio < with_head < 1.0


def test_input_validation_messages() -> None:
    dims = get_shape("llava-1.5-7b").dims
    with pytest.raises(ValueError, match=r"valid layers are 0\.\.31"):
        model_flops(dims, 64, 576, [0, 32])
    with pytest.raises(ValueError, match=r"\[-1\] out of range"):
        model_flops(dims, 64, 576, [-1])
    with pytest.raises(ValueError, match=r"v \(visual tokens\) must be >= 0, got -1"):
        layer_flops(dims, 64, -1, False)
    with pytest.raises(ValueError, match=r"t \(text tokens\) must be >= 0"):
        model_flops(dims, -3, 576)
    with pytest.raises(ValueError, match="at least one token"):
        flops_ratio(dims, 0, 0, [1])
    with pytest.raises(ValueError, match="formula must be one of"):
        layer_flops(dims, 1, 1, False, "approx")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lm_head_positions must be >= 1"):
        model_flops(dims, 1, 1, include_lm_head=True, lm_head_positions=0)
    with pytest.raises(ValueError, match="LayerDims.num_layers must be >= 1"):
        dataclasses.replace(dims, num_layers=0)


def test_layer_dims_from_causal_and_multimodal_configs() -> None:
    llava = LlavaConfig(text_config=shape_config("llava-1.5-13b").to_dict())
    assert LayerDims.from_config(llava) == get_shape("llava-1.5-13b").dims
    qwen_vl = Qwen2VLConfig(
        text_config=dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
        )
    )
    assert LayerDims.from_config(qwen_vl) == get_shape("qwen2-vl-7b").dims
    # Qwen2 configs carry no head_dim attribute: it is derived from hidden // heads.
    qwen_prefix = shape_config("qwen2-vl-7b", num_layers=3)
    assert LayerDims.from_config(qwen_prefix) == _layers(get_shape("qwen2-vl-7b").dims, 3)


def test_qk_norm_is_counted_per_normed_query_and_key() -> None:
    dims = get_shape("qwen3-vl-8b").dims
    plain = dataclasses.replace(dims, qk_norm=False)
    t, v, d = 64, 576, dims.head_dim
    for frozen, queries in ((False, t + v), (True, t)):
        extra = layer_flops(dims, t, v, frozen, "exact") - layer_flops(plain, t, v, frozen, "exact")
        assert extra == 4 * (queries * 32 + (t + v) * 8) * d  # q_norm on the updated tokens, k_norm on all
    assert layer_flops(dims, t, v, False, "paper") == layer_flops(plain, t, v, False, "paper")


def _moe_dims(**overrides) -> LayerDims:
    base = dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4,
                head_dim=128, num_layers=4, vocab_size=1000, num_experts=128, experts_per_token=8,
                moe_intermediate_size=768, dense_layers=(3,))
    return LayerDims(**{**base, **overrides})


def test_moe_layers_count_router_and_active_experts_per_routed_token() -> None:
    dims = _moe_dims()
    h, e, k, m = 2048, 128, 8, 768
    attention_only = dataclasses.replace(dims, num_experts=0, experts_per_token=0, moe_intermediate_size=0,
                                         intermediate_size=1)  # dense MLP of width 1: 6 FLOPs per token and h
    t, v = 64, 576
    for frozen, routed in ((False, t + v), (True, t)):
        ffn = layer_flops(dims, t, v, frozen, "exact", layer=0)
        rest = layer_flops(attention_only, t, v, frozen, "exact") - 2 * routed * 3 * h
        assert ffn - rest == 2 * routed * (h * e + 3 * k * m * h)  # router + k gated experts
    # Layer 3 keeps the dense MLP; the model sums its layers one by one.
    dense_layer = layer_flops(dims, t, v, False, "exact", layer=3)
    assert dense_layer == layer_flops(dataclasses.replace(dims, num_experts=0), t, v, False, "exact")
    assert model_flops(dims, t, v, [0, 3], "exact") == (
        layer_flops(dims, t, v, True, "exact", 0) + 2 * layer_flops(dims, t, v, False, "exact", 1)
        + layer_flops(dims, t, v, True, "exact", 3)
    )
    # Freezing skips the visual tokens' experts and their routing: here the 8 active experts are as wide as the
    # dense MLP (8 x 768 = 6144), so a sparse layer saves exactly the router's work on top.
    saved = [layer_flops(dims, t, v, False, "exact", i) - layer_flops(dims, t, v, True, "exact", i) for i in (0, 3)]
    assert saved[0] - saved[1] == 2 * v * h * e
    assert layer_flops(dims, t, v, False, "paper", 0) == 2 * 640 * (4 * h + 3 * k * m) * h + 4 * 640**2 * h
    with pytest.raises(ValueError, match="experts_per_token <= num_experts"):
        _moe_dims(experts_per_token=129)


def test_layer_dims_from_moe_and_qk_norm_configs() -> None:
    from transformers import Gemma3Config, Qwen3VLMoeConfig

    moe = Qwen3VLMoeConfig(text_config=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=6,
                                            num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                            num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                                            decoder_sparse_step=2, mlp_only_layers=[1], vocab_size=1000))
    dims = LayerDims.from_config(moe)
    assert (dims.num_experts, dims.experts_per_token, dims.moe_intermediate_size) == (128, 8, 768)
    assert dims.dense_layers == (0, 1, 2, 4) and dims.qk_norm  # odd-numbered steps are sparse, but 1 is listed
    assert [dims.is_moe(i) for i in range(6)] == [False, False, False, True, False, True]
    gemma = Gemma3Config(text_config=shape_config("gemma3-12b").to_dict())
    assert LayerDims.from_config(gemma) == get_shape("gemma3-12b").dims
    assert not LayerDims.from_config(shape_config("llava-1.5-7b")).qk_norm


def test_shape_config_layer_range() -> None:
    with pytest.raises(ValueError, match=r"must be in 1\.\.28, got 29"):
        shape_config("qwen2-vl-7b", num_layers=29)


def test_make_token_layout() -> None:
    layout = make_token_layout(3, n_text=6, n_visual=4, image_position=[0, 2, 6], vocab_size=100)
    # Not shortv.layout.TokenLayout (the engine's per-forward split): just the inputs of a shape benchmark.
    assert isinstance(layout, ShapeInputs)
    input_ids, visual_mask = layout
    assert input_ids is layout.input_ids and visual_mask is layout.visual_mask
    assert layout.input_ids.shape == layout.visual_mask.shape == (3, 10)
    assert layout.input_ids.dtype == torch.long and int(layout.input_ids.max()) < 100
    assert layout.visual_mask.sum(dim=1).tolist() == [4, 4, 4]
    assert [int(row.nonzero()[0]) for row in layout.visual_mask] == [0, 2, 6]
    default = make_token_layout(2, n_text=8, n_visual=3)
    assert default.visual_mask[:, 4:7].all() and default.visual_mask.sum() == 6
    assert torch.equal(default.input_ids, make_token_layout(2, n_text=8, n_visual=3).input_ids)
    with pytest.raises(ValueError, match=r"valid positions are 0\.\.6"):
        make_token_layout(1, n_text=6, n_visual=4, image_position=7)
    with pytest.raises(ValueError, match="one per row"):
        make_token_layout(2, n_text=6, n_visual=4, image_position=[1])


def test_build_shape_model_real_width_prefix() -> None:
    # One 4096-wide layer plus embeddings and LM head: ~0.9 GB in bf16.
    model = build_shape_model("llava-1.5-7b", num_layers=1)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert LayerDims.from_config(model.config) == _layers(get_shape("llava-1.5-7b").dims, 1)
    assert model.config._attn_implementation == "sdpa"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    weight = model.model.layers[0].mlp.up_proj.weight
    assert weight.float().std().item() == pytest.approx(0.02, rel=0.05)
    layout = make_token_layout(1, n_text=5, n_visual=3, vocab_size=model.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=layout.input_ids).logits
    assert logits.shape == (1, 8, 32064)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe", "gemma4"])
def test_exact_count_is_what_torch_counts_per_layer(family: str) -> None:
    """Every matrix product of every decoder layer of the hybrid / KV-sharing families, dense and frozen, as
    torch's FLOP counter sees them executed: linear-attention projections, convolution and chunked delta rule,
    output-gated attention, keys as values, KV-sharing layers, double-wide MLPs, MoE (routed, shared and parallel
    experts), per-layer-input branches. The counter skips element-wise work (norms, gates) and the delta rule's
    triangular solves, so those terms are taken out of the formula's count."""
    from torch.utils.flop_counter import FlopCounterMode
    from tiny_models import build_inputs, build_model

    from shortv import ShortVConfig, apply_shortv, remove_shortv
    from shortv.flops import norm_and_gate_flops

    model = build_model(family, "eager", init_std=0.2)  # eager: torch counts sdpa's CPU kernel as nothing
    model.set_experts_implementation("eager")  # ... and grouped-mm experts likewise
    # Inference weights: with `kernels` installed (transformers >= 5.25 pulls it in), the linear-attention convolution
    # runs as a hub-kernel *module*, and the counter's module tracker then hooks the gradient of its arguments; a
    # view of a parameter taken under no_grad has none, and the tracker fails ("Expected gradient function to be set").
    model.requires_grad_(False)
    inputs = build_inputs(model, family, batch_layouts=[dict(n_text_before=3, images=2, n_text_after=5)])
    dims = LayerDims.from_config(model.config)
    v = int(inputs.visual_mask.sum())
    t = inputs["input_ids"].numel() - v
    assert {dims.layer(i).kind for i in range(4)} == ({"attention"} if family == "gemma4" else
                                                      {"attention", "linear_attention"})
    # unpatched, two ShortV layers, and operator-level layers (each operator in both layer kinds; Gemma 4: the MLP
    # in the KV-sharing layer too)
    for config in (ShortVConfig([]), ShortVConfig([1, 2]), ShortVConfig(attention_layers=[1, 2], mlp_layers=[0, 3])):
        apply_shortv(model, config)
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                model(**inputs, use_cache=False)
        finally:
            remove_shortv(model)
        counts = counter.get_flop_counts()
        prefix = next(name for name in counts if name.endswith("language_model.layers.0"))[:-1]
        for index in range(4):
            layer = dims.layer(index)
            frozen = config.frozen_operators.get(index, False)
            expected = layer_flops(dims, t, v, frozen, "exact", index)
            expected -= norm_and_gate_flops(dims, t, v, bool(frozen) and "attention" in frozen, index)
            if layer.kind == "linear_attention":
                la = layer.linear
                padded = -(-(t + v) // la.chunk_size) * la.chunk_size
                expected -= la.value_heads * padded * (la.chunk_size - 1) * (la.key_head_dim + la.value_head_dim)
            assert sum(counts[prefix + str(index)].values()) == expected, (family, config, index)


def test_frozen_linear_attention_layer_saves_less_than_a_frozen_attention_layer() -> None:
    """At Qwen3.6-27B's shape: a frozen linear-attention layer still runs its in-projections, convolution and delta
    rule over every token; it saves exactly its output half (z projection, gated norm, out_proj) and its MLP on the
    visual tokens. A frozen softmax layer also saves their queries and attention."""
    dims = get_shape("qwen3.6-27b").dims
    t, v = 64, 576
    linear, full = dims.layer_kinds.index("linear_attention"), dims.layer_kinds.index("attention")
    saved = {index: layer_flops(dims, t, v, False, "exact", index) - layer_flops(dims, t, v, True, "exact", index)
             for index in (linear, full)}
    la, h, m = dims.layer(linear).linear, dims.hidden_size, dims.intermediate_size
    assert saved[linear] == v * (2 * h * la.value_dim * 2 + 5 * la.value_dim + 2 * 3 * h * m)
    assert saved[full] > saved[linear]
    # Freezing every full-attention layer saves more per layer than freezing as many linear-attention layers.
    full_layers = [i for i, kind in enumerate(dims.layer_kinds) if kind == "attention"]
    linear_layers = [i for i, kind in enumerate(dims.layer_kinds) if kind == "linear_attention"][: len(full_layers)]
    assert ideal_speedup(dims, t, v, full_layers, "exact") > ideal_speedup(dims, t, v, linear_layers, "exact") > 1
