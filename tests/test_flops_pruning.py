"""FLOPs of FastV, VTW and ShortV + FastV: the budget model against torch's FLOP counter on the slow pruning oracle
(tests/pruning_oracle.py), against the paper formula in closed form at LLaVA-1.5-7B's shape, and its errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from pruning_oracle import capture_decoder_calls, kept_columns, pruned_forward, rank_by_attention, stock_layer
from tiny_models import build_inputs, build_model

from shortv.flops import PAPER_SHAPES, LayerDims, get_shape, layer_flops, model_flops, norm_and_gate_flops
from shortv.flops_pruning import (
    LayerBudget,
    budget_flops,
    budget_ratio,
    dense_budget,
    fastv_budget,
    fastv_ratio,
    kept_visual_tokens,
    layer_budget_flops,
    ranking_flops,
    shortv_budget,
    token_budget,
    vtw_budget,
    vtw_ratio,
)

TEXT_TOKENS = 64  # the paper's FLOPs table assumes 64 text tokens, as tests/test_flops.py
#: ShortV's published layer order for LLaVA-1.5-7B (ascending visual LC); N = 19 takes all of it.
LLAVA_7B_ORDER = (31, 29, 30, 28, 0, 26, 27, 25, 24, 22, 23, 21, 2, 3, 20, 18, 17, 12, 19)
#: VTW's released default withdrawal layer for LLaVA-1.5-7B (0-based: layers 15.. run without visual tokens).
VTW_LLAVA_7B_K = 15


# ---------------------------------------------------------------- formula vs torch on the oracle, per family


def _torch_counted(dims: LayerDims, t: int, budget: LayerBudget, index: int) -> int:
    """The budget's FLOPs of layer ``index`` less what torch's counter does not see: element-wise norms and gates,
    and the delta rule's triangular solves (as in tests/test_flops.py)."""
    v, frozen = budget.visual, budget.frozen
    flops = layer_flops(dims, t, v, frozen, "exact", index) - norm_and_gate_flops(dims, t, v, frozen, index)
    layer = dims.layer(index)
    if layer.kind == "linear_attention":
        la = layer.linear
        padded = -(-(t + v) // la.chunk_size) * la.chunk_size
        flops -= la.value_heads * padded * (la.chunk_size - 1) * (la.key_head_dim + la.value_head_dim)
    return flops


def _counting(run_layer, counts: dict[int, int]):
    from torch.utils.flop_counter import FlopCounterMode

    def run(index, layer, hidden, visual, frozen, kwargs):
        with FlopCounterMode(display=False) as counter:
            out = run_layer(index, layer, hidden, visual, frozen, kwargs)
        counts[index] = counter.get_total_flops()
        return out
    return run


def _fast_frozen(model):
    """A layer runner whose frozen layers take ShortV's fast path (text rows only) on whatever tokens they get."""
    from shortv.layout import TokenLayout
    from shortv.registry import fast_layer_for

    fast = fast_layer_for(model)

    def run(index, layer, hidden, visual, frozen, kwargs):
        if not frozen:
            return stock_layer(index, layer, hidden, visual, frozen, kwargs)
        return fast.fast_frozen_forward(layer, TokenLayout.from_visual_mask(visual), hidden, **kwargs)
    return run


# Llama-like GQA, M-RoPE, sandwich norms + QK-norm + sliding windows, hybrid linear attention, hybrid + MoE.
FAMILIES = ["llama", "qwen2_vl", "gemma3", "qwen3_5", "qwen3_5_moe", "gemma4"]
#: Gemma 4 with six layers, the last two reusing the keys/values of layers 2 and 3, so that K = 1 and 2 are valid.
OVERRIDES = {"gemma4": dict(num_hidden_layers=6, layer_types=["sliding_attention", "full_attention"] * 3,
                            num_kv_shared_layers=2)}


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    family = request.param
    model = build_model(family, "eager", init_std=0.2, text_overrides=OVERRIDES.get(family))  # eager: torch counts sdpa's CPU kernel as nothing
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    model.requires_grad_(False)  # see test_exact_count_is_what_torch_counts_per_layer
    inputs = build_inputs(model, family, batch_layouts=[dict(n_text_before=3, images=2, n_text_after=5)])
    calls = capture_decoder_calls(model, inputs)
    return family, model, inputs, calls


@pytest.mark.parametrize(("method", "cut", "frozen"), [("fastv", 2, ()), ("vtw", 2, ()), ("shortv+fastv", 2, (1, 3)),
                                                       ("fastv", 1, ())])
def test_budget_flops_are_what_torch_counts_on_the_oracle(tiny, method: str, cut: int, frozen: tuple) -> None:
    """Every layer of the oracle's pruned forward (stock layers, ShortV's fast frozen layers where frozen), as torch
    counts it, is the budget's price of that layer: all visual tokens before the cut, the kept ones after it."""
    family, model, inputs, calls = tiny
    dims = LayerDims.from_config(model.config)
    visual = inputs.visual_mask
    v = int(visual.sum())
    t = visual.numel() - v
    ratio = 0.0 if method == "vtw" else 0.5
    budget = vtw_budget(dims, v, cut) if method == "vtw" else fastv_budget(dims, v, cut, ratio, frozen)
    if cut - 1 not in [i for i, kind in enumerate(dims.layer_kinds) if kind == "attention"]:
        kept = torch.arange(budget[-1].visual)[None]  # no attention to rank by: keep the first visual columns
        kept = visual.nonzero()[:, 1][kept]
    else:
        kept = lambda weights: rank_by_attention(weights, visual, budget[-1].visual)  # noqa: E731
    counts: dict[int, int] = {}
    run = _counting(_fast_frozen(model) if frozen else stock_layer, counts)
    out = pruned_forward(model, calls, visual, cut, kept, frozen, run_layer=run)
    assert out.hidden_states.shape[1] == t + budget[-1].visual
    expected = {i: _torch_counted(dims, t, budget[i], i) for i in range(dims.num_layers)}
    assert counts == expected, (family, method)
    assert sum(counts.values()) < sum(_torch_counted(dims, t, b, i) for i, b in enumerate(dense_budget(dims, v)))


def test_oracle_without_a_cut_is_the_model_and_pruning_changes_it(tiny) -> None:
    family, model, inputs, calls = tiny
    visual = inputs.visual_mask
    with torch.no_grad():
        reference = model(**inputs, use_cache=False, output_hidden_states=True).hidden_states[-1]
    layers = len(calls.kwargs)
    whole = pruned_forward(model, calls, visual, layers, torch.zeros(1, 0, dtype=torch.long))
    torch.testing.assert_close(whole.hidden_states, reference, rtol=0, atol=0)
    first_visual = int(visual[0].nonzero()[0])
    pruned = pruned_forward(model, calls, visual, 2, torch.tensor([[first_visual]]))
    columns = pruned.columns[0].tolist()
    assert columns == sorted(set((~visual[0]).nonzero()[:, 0].tolist()) | {first_visual})
    # The last token's state (what the next token is read from) changes once the visual tokens leave.
    assert not torch.allclose(pruned.hidden_states[0, -1], reference[0, -1], atol=1e-3), family
    # Before the first visual token, a causal model sees the same prefix: those rows are unchanged.
    torch.testing.assert_close(pruned.hidden_states[0, :first_visual], reference[0, :first_visual])


def test_oracle_refusals() -> None:
    visual = torch.tensor([[False, True, True, False]])
    with pytest.raises(ValueError, match="not visual"):
        kept_columns(visual, torch.tensor([[0]]))
    with pytest.raises(ValueError, match="different numbers of columns"):
        kept_columns(torch.tensor([[True, True], [True, False]]), torch.tensor([[0], [0]]))
    model = build_model("qwen3_vl", "eager")
    inputs = build_inputs(model, "qwen3_vl", batch_layouts=[dict(images=1)])
    calls = capture_decoder_calls(model, inputs)  # DeepStack after layers 0..2: replayed from layer 3's input
    assert calls.start == 3
    with pytest.raises(ValueError, match=r"cut must be in 4\.\.4"):
        pruned_forward(model, calls, inputs.visual_mask, 2, torch.zeros(1, 0, dtype=torch.long))


# ---------------------------------------------------------------- the budget model itself


@pytest.mark.parametrize("name", sorted(PAPER_SHAPES))
def test_dense_and_shortv_budgets_are_flops_py(name: str) -> None:
    shape = get_shape(name)
    dims, v = shape.dims, shape.visual_tokens
    frozen = [i for i in LLAVA_7B_ORDER if i < dims.num_layers]
    for formula in ("paper", "exact"):
        assert budget_flops(dims, TEXT_TOKENS, dense_budget(dims, v), formula) == model_flops(
            dims, TEXT_TOKENS, v, (), formula)
        assert budget_flops(dims, TEXT_TOKENS, shortv_budget(dims, v, frozen), formula) == model_flops(
            dims, TEXT_TOKENS, v, frozen, formula)
    # FastV keeping everything is the dense model; pruning at the first possible cut keeps layer 0 dense.
    assert fastv_ratio(dims, TEXT_TOKENS, v, 1, 0.0) == 1.0
    per_layer = layer_budget_flops(dims, TEXT_TOKENS, fastv_budget(dims, v, 2, 0.5))
    kept = kept_visual_tokens(v, 0.5)
    assert per_layer == [layer_flops(dims, TEXT_TOKENS, v if i < 2 else kept, False, "exact", i)
                         for i in range(dims.num_layers)]


def test_budget_layers_and_composition() -> None:
    dims = dataclasses.replace(get_shape("llava-1.5-7b").dims, num_layers=6)
    assert fastv_budget(dims, 10, 2, 0.5, frozen_layers=[1, 4]) == (
        LayerBudget(10), LayerBudget(10, True), LayerBudget(5), LayerBudget(5), LayerBudget(5, True), LayerBudget(5))
    assert vtw_budget(dims, 10, 3, frozen_layers=[4]) == (
        LayerBudget(10), LayerBudget(10), LayerBudget(10), LayerBudget(0), LayerBudget(0, True), LayerBudget(0))
    assert token_budget(dims, 10, cut=3, kept=0) == vtw_budget(dims, 10, 3)
    # A frozen layer without visual tokens costs what a dense text-only layer costs.
    assert layer_budget_flops(dims, 8, vtw_budget(dims, 10, 3, [4]))[4] == layer_flops(dims, 8, 0, False)
    # With no text either, a VTW layer computes nothing.
    assert layer_budget_flops(dims, 0, vtw_budget(dims, 10, 3))[3:] == [0, 0, 0]
    assert [kept_visual_tokens(576, r) for r in (0.0, 0.5, 0.75, 0.9)] == [576, 288, 144, 58]
    assert kept_visual_tokens(5, 0.5) == 3  # 2.5 rounds up


def test_ranking_cost() -> None:
    dims = get_shape("llava-1.5-7b").dims
    n = TEXT_TOKENS + 576
    assert ranking_flops(dims, TEXT_TOKENS, 576, 2) == 2 * n * 4096
    assert ranking_flops(dims, TEXT_TOKENS, 576, 2, "mean") == 2 * n * n * 4096
    dense = model_flops(dims, TEXT_TOKENS, 576, formula="exact")
    assert ranking_flops(dims, TEXT_TOKENS, 576, 2) / dense < 1e-6  # negligible for the last token
    assert ranking_flops(dims, TEXT_TOKENS, 576, 2, "mean") / dense < 1e-3  # ... and small for the mean
    with_ranking = fastv_ratio(dims, TEXT_TOKENS, 576, 2, 0.5, ranking="mean")
    assert with_ranking == pytest.approx(fastv_ratio(dims, TEXT_TOKENS, 576, 2, 0.5) + 2 * n * n * 4096 / dense)
    hybrid = get_shape("qwen3.6-27b").dims  # full attention at layers 3, 7, ...: FastV can rank after layer 3
    assert ranking_flops(hybrid, TEXT_TOKENS, 576, 4) > 0
    with pytest.raises(ValueError, match=r"layer K - 1 = 1, a linear_attention layer here; .*\[4, 8, 12"):
        ranking_flops(hybrid, TEXT_TOKENS, 576, 2)


def test_bad_parameters_get_one_clear_line() -> None:
    dims = get_shape("llava-1.5-7b").dims
    for ratio in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"R \(the fraction of visual tokens pruned\) must be in \[0, 1\)"):
            fastv_ratio(dims, 64, 576, 2, ratio)
    for k in (0, 32, -1):
        with pytest.raises(ValueError, match=r"K \(the first pruned layer\) must be in 1\.\.31"):
            vtw_ratio(dims, 64, 576, k)
    with pytest.raises(ValueError, match=r"kept visual tokens must be in 0\.\.576, got 577"):
        token_budget(dims, 576, cut=2, kept=577)
    with pytest.raises(ValueError, match="the budget has 2 layers, the model 32"):
        budget_flops(dims, 64, (LayerBudget(1), LayerBudget(1)))
    with pytest.raises(ValueError, match=r"\[32\] out of range"):
        fastv_budget(dims, 576, 2, 0.5, frozen_layers=[32])
    with pytest.raises(ValueError, match="ranking must be one of"):
        ranking_flops(dims, 64, 576, 2, "first")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="LayerBudget.visual must be >= 0"):
        LayerBudget(-1)


# ---------------------------------------------------------------- the paper's shape: LLaVA-1.5-7B


def _paper_layer(n: int, h: int = 4096, m: int = 11008) -> int:
    """The paper's dense layer over ``n`` tokens, written out again here: ``2n(4h + 3m)h + 4n^2 h``."""
    return 2 * n * (4 * h + 3 * m) * h + 4 * n * n * h


def _paper_frozen(t: int, v: int, h: int = 4096, m: int = 11008) -> int:
    """The paper's ShortV layer: ``2t(4h + 3m)h + 4vh^2 + 4t(t + v)h``."""
    return 2 * t * (4 * h + 3 * m) * h + 4 * v * h * h + 4 * t * (t + v) * h


def test_llava_7b_fastv_vtw_and_composition_in_closed_form() -> None:
    dims, t, v = get_shape("llava-1.5-7b").dims, TEXT_TOKENS, 576
    dense = 32 * _paper_layer(t + v)
    # FastV K = 2, R = 50%: two dense layers, then 30 layers over 64 + 288 tokens.
    fastv = fastv_ratio(dims, t, v, 2, 0.5, formula="paper")
    assert fastv == (2 * _paper_layer(640) + 30 * _paper_layer(352)) / dense
    assert fastv == pytest.approx(0.5723, abs=1e-4)
    # VTW at its released K = 15: 15 dense layers, then 17 over the text alone.
    vtw = vtw_ratio(dims, t, v, VTW_LLAVA_7B_K, formula="paper")
    assert vtw == (15 * _paper_layer(640) + 17 * _paper_layer(64)) / dense
    assert vtw == pytest.approx(0.5207, abs=1e-4)
    # ShortV N = 19 (55%) and ShortV + FastV: frozen layer 0 before the cut holds all 576 visual tokens, the 18
    # frozen layers after it the 288 kept ones; 1 dense layer before, 12 dense layers after the cut.
    shortv = budget_ratio(dims, t, v, shortv_budget(dims, v, LLAVA_7B_ORDER), "paper")
    assert shortv == pytest.approx(0.552, abs=5e-4)
    both = fastv_ratio(dims, t, v, 2, 0.5, LLAVA_7B_ORDER, formula="paper")
    assert both == (_paper_frozen(64, 576) + _paper_layer(640) + 18 * _paper_frozen(64, 288)
                    + 12 * _paper_layer(352)) / dense
    assert both == pytest.approx(0.3393, abs=1e-4)  # not the paper's 29%: see docs/comparisons_flops.md
    assert both < min(shortv, fastv)
    # GQA-aware count, and the ranking cost: the ratios move by less than a tenth of a point.
    assert fastv_ratio(dims, t, v, 2, 0.5, LLAVA_7B_ORDER, "exact", ranking="last") == pytest.approx(both, abs=1e-3)


def test_which_fastv_setting_gives_the_papers_29_percent() -> None:
    """docs/comparisons_flops.md's finding: with ShortV N = 19, no standard FastV setting reaches 29%; at K = 2 it
    takes at most 220 kept visual tokens (R >= 61.8%); at R = 50%, N = 24 or ~18 text tokens would."""
    dims, t, v = get_shape("llava-1.5-7b").dims, TEXT_TOKENS, 576

    def composed(k, kept, frozen=LLAVA_7B_ORDER, text=t):
        return budget_ratio(dims, text, v, token_budget(dims, v, frozen, cut=k, kept=kept), "paper")

    for k in (2, 3):
        for ratio in (0.5, 0.75):
            assert abs(composed(k, kept_visual_tokens(v, ratio)) - 0.29) > 0.04
    assert composed(2, 220) <= 0.29 < composed(2, 221)
    more = [*LLAVA_7B_ORDER, 4, 5, 6, 7, 8]  # 5 more layers after the cut: N = 24
    assert composed(2, 288, more) == pytest.approx(0.281, abs=1e-3)
    assert composed(2, 288, text=18) <= 0.29 < composed(2, 288, text=19)
