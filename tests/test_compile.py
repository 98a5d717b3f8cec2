"""torch.compile of a patched model gives the eager ShortV results (default backend and aot_eager), and new
prompt layouts do not recompile it every time."""

import pytest
import torch
from tiny_models import build_inputs, build_model, default_layouts, reset_state

from shortv import apply_shortv, disable_shortv, remove_shortv

FROZEN = [1, 2]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compiled_forward_and_generate_equal_eager_shortv(backend):
    model = build_model("llama", init_std=0.2)
    inputs = build_inputs(model, "llama", batch_layouts=default_layouts("llama", batch_size=2))
    mask = inputs.visual_mask
    apply_shortv(model, FROZEN)
    with torch.no_grad():
        eager = model(**inputs, visual_mask=mask).logits
        eager_tokens = model.generate(**inputs, visual_mask=mask, max_new_tokens=3, do_sample=False)
        with disable_shortv(model):
            baseline = model(**inputs, visual_mask=mask).logits
        model.forward = torch.compile(model.forward, backend=backend)
        try:
            compiled = model(**inputs, visual_mask=mask).logits
            compiled_tokens = model.generate(**inputs, visual_mask=mask, max_new_tokens=3, do_sample=False)
        finally:
            del model.forward
    remove_shortv(model)
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(compiled[keep], eager[keep], rtol=0, atol=1e-4)
    assert (eager[keep] - baseline[keep]).abs().max() > 1e-2  # ShortV really ran inside the compiled forward
    assert torch.equal(compiled_tokens, eager_tokens)


def test_compiled_multimodal_model_equals_eager_shortv():
    model = build_model("llava", init_std=0.2)
    inputs = build_inputs(model, "llava", batch_layouts=default_layouts("llava", batch_size=2))
    apply_shortv(model, FROZEN)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        eager = model(**inputs).logits
        got = compiled(**inputs).logits
        with disable_shortv(model):
            baseline = model(**inputs).logits
    remove_shortv(model)
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[keep], eager[keep], rtol=0, atol=1e-4)
    assert (eager[keep] - baseline[keep]).abs().max() > 1e-2


def test_new_layouts_do_not_recompile_every_prompt():
    from torch._dynamo.utils import counters

    model = build_model("llama", init_std=0.2)
    apply_shortv(model, FROZEN)
    compiled = torch.compile(model, backend="eager")
    graphs = []
    for index in range(8):
        layout = dict(n_text_before=2 + index, images=1 + index % 2, n_text_after=3 + (index * 7) % 5, seed=index)
        inputs = build_inputs(model, "llama", batch_layouts=[layout])
        with torch.no_grad():
            reset_state(model)
            compiled(**inputs, visual_mask=inputs.visual_mask)
        graphs.append(counters["stats"]["unique_graphs"])
    remove_shortv(model)
    # the second layout makes dynamo mark the sizes dynamic; from then on every new layout reuses the graphs
    assert graphs[2:] == [graphs[1]] * (len(graphs) - 2)


def test_graph_breaks_do_not_grow_with_the_frozen_layers():
    """One break (the entry hook) however many layers are frozen. On the GPU machine's torch 2.11 the frozen forward
    once broke the graph in every frozen layer (``function.__get__``) and then hit dynamo's recompile limit (8);
    more frozen layers than that limit are frozen here."""
    model = build_model("llama", init_std=0.2, text_overrides={"num_hidden_layers": 12})
    inputs = build_inputs(model, "llama", batch_layouts=default_layouts("llama", batch_size=2))
    apply_shortv(model, list(range(1, 11)))
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(**inputs, visual_mask=inputs.visual_mask)
    remove_shortv(model)
    assert explained.graph_break_count == 1, [reason.reason for reason in explained.break_reasons]
    assert explained.graph_count == 2


def test_compiled_hybrid_model_equals_eager_shortv():
    """Frozen layers of both kinds of Qwen3.5 (output-gated attention layer 1, Gated DeltaNet layer 2) trace and
    give the eager results."""
    family = "qwen3_5"
    model = build_model(family, init_std=0.2)
    inputs = build_inputs(model, family, batch_layouts=default_layouts(family, batch_size=2))
    apply_shortv(model, FROZEN)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        reset_state(model)
        eager = model(**inputs).logits
        reset_state(model)
        got = compiled(**inputs).logits
        with disable_shortv(model):
            reset_state(model)
            baseline = model(**inputs).logits
    remove_shortv(model)
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[keep], eager[keep], rtol=0, atol=1e-4)
    assert (eager[keep] - baseline[keep]).abs().max() > 1e-2
