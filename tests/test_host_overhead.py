"""Host cost of a frozen layer, counted exactly: aten operators dispatched per layer (issue #23, item 1).

On a GPU a batch-1 eager prefill is bound by the host launching kernels, so a frozen layer must dispatch no more
than a dense one. Counted with `shortv.benchmark.dispatch` (the counter of ``benchmarks/bench_host_overhead.py``)
on the paper shapes' miniatures (hidden 64, the family's layer anatomy), batch 1, one image span: every frozen
layer but the first of its kind (that one builds the forward's text-query mask and RoPE tables, counted apart) is
compared with the same layer run dense. A decode step (no visual token) dispatches exactly what the unpatched model
dispatches and reads nothing back from the device.
"""

import copy

import pytest
import torch
from packaging.version import Version
from tiny_models import build_inputs, build_model

from shortv import apply_shortv, disable_shortv, remove_shortv, using_visual_mask
from shortv._compat import TRANSFORMERS_VERSION
from shortv.benchmark import causal_lm_inputs, shape_shortv_config
from shortv.benchmark.dispatch import count_ops, kernels, syncs, total
from shortv.benchmark.shapes import build_shape_model, miniature
from shortv.flops import get_shape
from shortv.registry import find_decoder_layers, layer_types

pytestmark = pytest.mark.usefixtures("one_thread")

#: shape -> (decoder layers, frozen layers, {layer kind: (not-view operators, all operators) of a frozen layer
#: minus the same layer dense}). Gemma 3 has a global layer every 6th, Qwen3.5/3.6 a full-attention layer every 4th:
#: two frozen layers of each kind, so the second one's count is the steady state.
SHAPES = {
    "llava-1.5-7b": (4, [1, 2], {"full_attention": (-4, -4)}),
    "qwen2-vl-7b": (4, [1, 2], {"full_attention": (-4, 2)}),  # grouped KV: K/V repeated per head (views) under a mask
    "qwen3-vl-8b": (4, [1, 2], {"full_attention": (-4, 2)}),
    "gemma3-12b": (12, [1, 2, 5, 11], {"sliding_attention": (-4, 2), "full_attention": (-4, 2)}),
    "qwen3.6-27b": (8, [1, 2, 3, 7], {"linear_attention": (2, -4), "full_attention": (-4, 1)}),
}
if TRANSFORMERS_VERSION < Version("5.25"):
    # Before 5.25 the dense Gated DeltaNet neither split its inputs for recorded states nor concatenated its (single)
    # chunked output: one operator (and five views) fewer for the dense layer; the frozen layer dispatches the same.
    SHAPES["qwen3.6-27b"][2]["linear_attention"] = (3, 2)
#: Issue #23: a frozen layer dispatches at most this many more operators than a dense one (not views, all).
BUDGET = {"llava-1.5-7b": (1, 8)}
DEFAULT_BUDGET = (2 if TRANSFORMERS_VERSION >= Version("5.25") else 3, None)


def shape_model(name, num_layers, visual_tokens=12, text_tokens=8):
    shape = miniature(get_shape(name), num_layers=num_layers, visual_tokens=visual_tokens)
    model = build_shape_model(shape, dtype=torch.float32)
    return model, causal_lm_inputs(1, text_tokens, visual_tokens, shape.dims.vocab_size)


def prefill_counts(model, inputs, variant):
    """Operators per decoder layer (and None: outside them) of one prefill forward: ShortV on, or off."""

    def forward():
        with torch.inference_mode(), using_visual_mask(model, inputs.visual_mask):
            model(**inputs.kwargs, use_cache=True, logits_to_keep=1)

    if variant == "baseline":
        with disable_shortv(model):
            return count_ops(forward, find_decoder_layers(model))
    return count_ops(forward, find_decoder_layers(model))


def steady_frozen_layers(model, frozen):
    """(index, kind) of each frozen layer that is not the first frozen layer of its kind."""
    kinds = layer_types(model) or ["full_attention"] * len(find_decoder_layers(model))
    seen, steady = set(), []
    for index in sorted(frozen):
        if kinds[index] in seen:
            steady.append((index, kinds[index]))
        seen.add(kinds[index])
    return steady


@pytest.mark.parametrize("name", list(SHAPES))
def test_frozen_layer_dispatches_no_more_than_a_dense_layer(name):
    num_layers, frozen, expected = SHAPES[name]
    model, inputs = shape_model(name, num_layers)
    apply_shortv(model, frozen)
    base, fast = prefill_counts(model, inputs, "baseline"), prefill_counts(model, inputs, "shortv")
    steady = steady_frozen_layers(model, frozen)
    assert {kind for _, kind in steady} == set(expected)
    kernel_budget, all_budget = BUDGET.get(name, DEFAULT_BUDGET)
    for index, kind in steady:
        extra = (kernels(fast[index]) - kernels(base[index]), sum(fast[index].values()) - sum(base[index].values()))
        assert extra == expected[kind], (index, kind, fast[index] - base[index], base[index] - fast[index])
        assert extra[0] <= kernel_budget and (all_budget is None or extra[1] <= all_budget)
    # Non-triviality: the frozen layers took the fast path (its row gathers), the dense ones did not.
    assert all(fast[index]["aten.index_add"] == 1 for index in frozen)
    assert all(fast[index] == base[index] for index in range(num_layers) if index not in frozen)


def test_llava_prefill_with_the_paper_layers_dispatches_fewer_operators_than_the_baseline():
    """The benchmark's setup: the full-depth LLaVA-1.5-7B miniature, 48 visual + 16 text tokens, the paper's 19
    layers. Everything a forward adds once (the layout at the entry: 2 operators, one device read; the first frozen
    layer's mask and RoPE tables) is paid back by the frozen layers."""
    name = "llava-1.5-7b"
    model, inputs = shape_model(name, get_shape(name).dims.num_layers, visual_tokens=48, text_tokens=16)
    config, _ = shape_shortv_config(name)
    apply_shortv(model, config)
    base, fast = prefill_counts(model, inputs, "baseline"), prefill_counts(model, inputs, "shortv")
    assert len(config.layers) == 19
    base_total, fast_total = total(base), total(fast)
    assert kernels(fast_total) - kernels(base_total) == -4 * 18 + 1 + 2
    assert sum(fast_total.values()) - sum(base_total.values()) == -4 * 18 + 10 + 6
    first = sorted(config.layers)[0]
    assert (kernels(fast[first]) - kernels(base[first]), kernels(fast[None]) - kernels(base[None])) == (1, 2)
    assert syncs(fast_total) == syncs(base_total) + 1  # the entry's nonzero; the layers read nothing back


def decode_step_counts(model, step, cache):
    return total(count_ops(lambda: model(**step, past_key_values=copy.deepcopy(cache), use_cache=True)))


@pytest.mark.parametrize("name", ["llava-1.5-7b", "qwen3.6-27b"])
def test_decode_step_dispatches_exactly_the_unpatched_operators(name):
    """generate's second forward, with the prompt's visual mask in context (bare causal LM). Qwen3.6's hybrid cache
    counts its linear-attention layers' positions on the device: the entry must not read that count back."""
    model, inputs = shape_model(name, 4)
    apply_shortv(model, [1, 2])
    ids = inputs.kwargs["input_ids"]
    step = {"input_ids": ids[:, -1:], "attention_mask": torch.ones(1, ids.shape[1] + 1, dtype=torch.long)}
    with torch.inference_mode(), using_visual_mask(model, inputs.visual_mask):
        cache = model(**inputs.kwargs, use_cache=True).past_key_values
        patched = decode_step_counts(model, step, copy.deepcopy(cache))
    remove_shortv(model)
    with torch.inference_mode():
        unpatched = decode_step_counts(model, step, cache)
    assert patched == unpatched
    assert syncs(patched) == syncs(unpatched)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_generate_adds_operators_in_the_prefill_only(family):
    """Visual positions from the input ids (LLaVA; Qwen2-VL with M-RoPE): a cached step without pixels is text, so
    what ShortV changes in ``generate`` is the prompt's forward, whatever the number of decode steps."""
    model = build_model(family)
    inputs = build_inputs(model, family, batch_layouts=[dict(n_text_before=3, images=1, n_text_after=4)])
    apply_shortv(model, [1, 2])

    def change(new_tokens):
        def generate():
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

        fast = total(count_ops(generate))
        with disable_shortv(model):
            base = total(count_ops(generate))
        return fast - base, base - fast

    prefill_only = change(1)
    assert prefill_only[0] and prefill_only[1]  # ShortV did change the prompt's forward
    assert change(4) == prefill_only


def test_mrope_frozen_layer_dispatches_no_more_than_a_dense_layer():
    """Qwen2-VL's own model (3-D M-RoPE positions composed by its rotary module), batch 1, one image."""
    family, frozen = "qwen2_vl", [1, 2]
    model = build_model(family)
    inputs = build_inputs(model, family, batch_layouts=[dict(n_text_before=3, images=1, n_text_after=4)])
    apply_shortv(model, frozen)
    layers = find_decoder_layers(model)

    def forward():
        with torch.inference_mode():
            model.model.rope_deltas = None
            model(**inputs, use_cache=True, logits_to_keep=1)

    with disable_shortv(model):
        base = count_ops(forward, layers)
    fast = count_ops(forward, layers)
    # 2 KV heads for 4 query heads: under the text queries' mask sdpa gets K/V repeated per query head (two copies;
    # the dense layer's maskless call shares them). The miniatures above have one KV head: repeating it is a view.
    assert (kernels(fast[2]) - kernels(base[2]), sum(fast[2].values()) - sum(base[2].values())) == (-2, 2)
