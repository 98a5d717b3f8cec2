"""FLOPs of operator-level frozen layers, per family, and operator selection under a FLOPs budget."""

import dataclasses
import random

import pytest

from shortv import ShortVConfig
from shortv.contribution import LCResult
from shortv.flops import (
    PAPER_SHAPES,
    LayerDims,
    flops_ratio,
    get_shape,
    layer_flops,
    model_flops,
    operator_saving,
)
from shortv.selection import select_operators

T, V = 64, 576


def test_paper_formula_splits_into_attention_and_mlp():
    dims = get_shape("llava-1.5-7b").dims
    h, m, n = dims.hidden_size, dims.intermediate_size, T + V
    assert operator_saving(dims, T, V, 0, "attention", "paper") == 4 * V * h * h + 4 * n * V * h
    assert operator_saving(dims, T, V, 0, "mlp", "paper") == 6 * V * m * h
    # multi-head attention: the exact count is the paper's, per operator too
    for operator in ("attention", "mlp"):
        assert operator_saving(dims, T, V, 0, operator, "exact") == operator_saving(dims, T, V, 0, operator, "paper")
    # of what a LLaVA-1.5-7B ShortV layer saves at t=64, v=576, the MLP is 78% (keys and values are still computed)
    share = operator_saving(dims, T, V, 0, "mlp") / (layer_flops(dims, T, V, False) - layer_flops(dims, T, V, True))
    assert 0.77 < share < 0.78


def test_gqa_and_qk_norm_attention_savings():
    dims = get_shape("qwen3-vl-8b").dims  # GQA (8 KV heads of 32) and QK-norm
    h, q = dims.hidden_size, dims.num_attention_heads * dims.head_dim
    # queries and o_proj of the visual tokens, their attention rows, and the RMSNorm of their queries (4 / element);
    # keys and values (and the keys' norm) are still computed for every token
    assert operator_saving(dims, T, V, 0, "attention") == 2 * V * h * q * 2 + 4 * V * (T + V) * q + 4 * V * q
    assert operator_saving(dims, T, V, 0, "mlp") == 2 * V * 3 * h * dims.intermediate_size


def test_moe_mlp_saving_counts_router_and_active_experts():
    dims = LayerDims(hidden_size=256, intermediate_size=0, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                     num_layers=2, vocab_size=100, num_experts=8, experts_per_token=2, moe_intermediate_size=96,
                     shared_expert_intermediate_size=128)
    h, active, shared = 256, 2 * 96, 128
    expected = 2 * V * (h * 8 + h * 2 * active + active * h + h * 2 * shared + shared * h + h * 1)
    assert operator_saving(dims, T, V, 0, "mlp") == expected


def test_linear_attention_layer_saves_its_output_half():
    dims = get_shape("qwen3.6-27b").dims
    linear = dims.layer_kinds.index("linear_attention")
    la, h = dims.layer(linear).linear, dims.hidden_size
    # in_proj_z and out_proj on visual tokens, and the gated RMSNorm (5 / element); the state runs over every token
    assert operator_saving(dims, T, V, linear, "attention") == V * (2 * h * la.value_dim * 2 + 5 * la.value_dim)


@pytest.mark.parametrize("name", sorted(PAPER_SHAPES))
@pytest.mark.parametrize("formula", ["paper", "exact"])
def test_operator_savings_add_up_to_the_shortv_layer(name, formula):
    dims = get_shape(name).dims
    for layer in range(dims.num_layers):
        whole = layer_flops(dims, T, V, False, formula, layer) - layer_flops(dims, T, V, True, formula, layer)
        parts = [operator_saving(dims, T, V, layer, operator, formula) for operator in ("attention", "mlp")]
        assert sum(parts) == whole and min(parts) > 0


def test_gemma4_per_layer_input_branch_is_saved_by_shortv_layers_only():
    """Gemma 4's per-layer-input branch belongs to neither operator: an operator-level layer runs it on every token;
    a ShortV layer skips it on visual tokens (its gate and projection, 2 x hidden x p each per token)."""
    from tiny_models import build_model

    dims = LayerDims.from_config(build_model("gemma4").config)
    for layer in range(dims.num_layers):
        whole = layer_flops(dims, T, V, False, "exact", layer) - layer_flops(dims, T, V, True, "exact", layer)
        parts = [operator_saving(dims, T, V, layer, operator) for operator in ("attention", "mlp")]
        p = dims.layer(layer).per_layer_input_size
        assert p > 0 and min(parts) > 0
        assert whole - sum(parts) == 2 * V * 2 * dims.hidden_size * p


def test_model_flops_with_operator_layers():
    dims = get_shape("qwen3.6-27b").dims
    total = model_flops(dims, T, V, [3], "exact", attention_layers=[0, 7], mlp_layers=[1])
    expected = sum(layer_flops(dims, T, V, {0: {"attention"}, 7: {"attention"}, 1: {"mlp"}, 3: True}.get(i, False),
                               "exact", i) for i in range(dims.num_layers))
    assert total == expected
    # both operators of a layer through the two lists is the ShortV layer
    assert model_flops(dims, T, V, (), "exact", attention_layers=[5], mlp_layers=[5]) == model_flops(dims, T, V, [5],
                                                                                                     "exact")
    with pytest.raises(ValueError, match="unknown operator"):
        layer_flops(dims, T, V, {"ffn"}, "exact", 0)
    with pytest.raises(ValueError, match="out of range"):
        model_flops(dims, T, V, (), "exact", mlp_layers=[64])


def _lc(num_layers, seed=0, operators=True):
    rng = random.Random(seed)
    types = ("visual", "visual_attention", "visual_mlp") if operators else ("visual",)
    per_sample = {key: [[rng.random() for _ in range(num_layers)] for _ in range(2)] for key in types}
    return LCResult(num_layers=num_layers, token_types=types, sample_ids=["a", "b"], per_sample=per_sample,
                    model_id="m")


@pytest.mark.parametrize("name", ["llava-1.5-7b", "qwen2-vl-7b", "qwen3.6-27b"])
@pytest.mark.parametrize("target", [0.5, 0.8, 0.95])
def test_select_operators_meets_the_flops_target_within_one_operator(name, target):
    dims = get_shape(name).dims
    lc = _lc(dims.num_layers)
    config = select_operators(lc, flops_ratio=target, dims=dims, text_tokens=T, visual_tokens=V)
    achieved = flops_ratio(dims, T, V, config.layers, "exact", attention_layers=config.attention_layers,
                           mlp_layers=config.mlp_layers)
    assert achieved == pytest.approx(config.provenance["flops_ratio"]) and achieved <= target
    # greedy by mean LC per FLOP saved, written out here
    means = lc.mean
    candidates = sorted(((means[f"visual_{op}"][layer] / operator_saving(dims, T, V, layer, op), layer, op)
                         for layer in range(dims.num_layers) for op in ("attention", "mlp")))
    count = config.provenance["n_operators"]
    chosen = {(layer, op) for _, layer, op in candidates[:count]}
    got = {(layer, op) for layer, ops in config.frozen_operators.items() for op in ops}
    assert got == chosen
    last_layer, last_op = candidates[count - 1][1:]
    dense = model_flops(dims, T, V, (), "exact")
    assert target - achieved < operator_saving(dims, T, V, last_layer, last_op) / dense
    assert config.operator_level and config.mode == "fast"


def test_select_operators_by_count_and_errors(tmp_path):
    dims = get_shape("llava-1.5-7b").dims
    lc = _lc(32)
    config = select_operators(lc, n=5, dims=dims)
    assert sum(len(ops) for ops in config.frozen_operators.values()) == 5
    assert ShortVConfig.load(config.save(tmp_path / "c.json")) == config
    with pytest.raises(ValueError, match="shortv calibrate --operators"):
        select_operators(_lc(32, operators=False), n=3, dims=dims)
    with pytest.raises(ValueError, match="exactly one of"):
        select_operators(lc, dims=dims)
    with pytest.raises(ValueError, match="below what freezing every operator reaches"):
        select_operators(lc, flops_ratio=0.01, dims=dims)
    with pytest.raises(ValueError, match="dims describe 40 layers"):
        select_operators(lc, n=1, dims=dataclasses.replace(dims, num_layers=40))
