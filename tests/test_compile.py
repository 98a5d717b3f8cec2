"""torch.compile of a patched model gives the eager ShortV results (default backend and aot_eager), and new
prompt layouts do not recompile it every time."""

import pytest
import torch
from tiny_models import build_inputs, build_model, default_layouts, reset_state

from shortv import apply_shortv, disable_shortv, remove_shortv
from shortv.cuda_graphs import compile_decoder, decoder_stack, pad_to_bucket, static_cache, uncompile_decoder

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


# ---- CUDA graphs: the decoder stack compiled whole, a static cache, prompts padded to a bucket ------------------
class GraphCounter:
    """A torch.compile backend that keeps every graph dynamo hands it and runs it as traced (no inductor)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph, example_inputs):
        self.graphs.append(graph)
        return graph.forward


#: seed 0: one image size for every sample (the Qwen2-VL miniature draws sizes by seed).
ONE_IMAGE = dict(n_text_before=3, images=1, seed=0, n_text_after=5)
#: Batches of one padded prompt length whose samples hold one image each at different places. Each has a shorter,
#: padded sample: generate drops an all-ones attention mask, and a mask or none are different graphs.
SAME_BUCKET = [
    [dict(n_text_before=6, images=1, seed=0, n_text_after=2), dict(n_text_before=1, images=1, seed=0, n_text_after=3)],
    [dict(n_text_before=1, images=1, seed=0, n_text_after=7), dict(n_text_before=2, images=1, seed=0, n_text_after=1)],
    [dict(n_text_before=5, images=1, seed=0, n_text_after=1), ONE_IMAGE],
]


def _generate(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, do_sample=False, **kwargs)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_cuda_graph_recipe_compiles_one_prefill_and_one_decode_graph_per_bucket(family):
    """Every padded batch of the bucket (image anywhere) reuses one prefill and one decode graph of the whole decoder
    stack, with no graph break, and generates exactly the eager ShortV tokens. A batch without padding (generate
    then passes no attention mask) adds a prefill graph; the baseline, under `disable_shortv`, its own two."""
    from torch._dynamo.utils import counters

    counters.clear()
    model = build_model(family, init_std=0.2)
    apply_shortv(model, FROZEN)
    batches = [build_inputs(model, family, batch_layouts=layouts) for layouts in SAME_BUCKET]
    batches.append(build_inputs(model, family, batch_layouts=[ONE_IMAGE, ONE_IMAGE]))  # no padding
    assert len({tuple(inputs["input_ids"].shape) for inputs in batches}) == 1
    eager = [_generate(model, inputs) for inputs in batches]
    with disable_shortv(model):
        eager_baseline = _generate(model, batches[0])
    counter = GraphCounter()
    compile_decoder(model, backend=counter)
    batch, length = batches[0]["input_ids"].shape
    cache = static_cache(model, batch, length + 4)
    graphs = []
    try:
        for inputs, expected in zip(batches, eager):
            cache.reset()
            assert torch.equal(_generate(model, inputs, cache=cache), expected)
            graphs.append(len(counter.graphs))
        with disable_shortv(model):
            cache.reset()
            assert torch.equal(_generate(model, batches[0], cache=cache), eager_baseline)
            graphs.append(len(counter.graphs))
    finally:
        uncompile_decoder(model)
    remove_shortv(model)
    assert graphs == [2, 2, 2, 3, 5]
    assert not counters["graph_break"]


def test_cuda_graph_prefill_logits_equal_eager_shortv_and_visual_count_sets_the_graph():
    """The compiled stack's prefill into a static cache, on prompts left-padded to a bucket, gives the eager ShortV
    logits, which differ from the baseline's (ShortV ran inside the graph). One graph serves prompts of any length
    with one image; two images (other text rows in the frozen layers) need a second."""
    model = build_model("llava", init_std=0.2)
    two_images = dict(n_text_before=1, images=2, n_text_between=1, n_text_after=2)
    prompts = [SAME_BUCKET[1], [ONE_IMAGE, dict(n_text_before=2, images=1, n_text_after=1)], [two_images] * 2]
    prompts = [build_inputs(model, "llava", batch_layouts=layouts) for layouts in prompts]
    bucket = max(inputs["input_ids"].shape[1] for inputs in prompts) + 1
    for inputs in prompts:
        inputs.update(pad_to_bucket(bucket, inputs["input_ids"], inputs["attention_mask"]))
    apply_shortv(model, FROZEN)
    counter = GraphCounter()
    cache = static_cache(model, 2, bucket + 4)
    graphs = []
    with torch.no_grad():
        for inputs in prompts:
            eager = model(**inputs).logits
            with disable_shortv(model):
                baseline = model(**inputs).logits
            compile_decoder(model, backend=counter)
            try:
                cache.reset()
                got = model(**inputs, cache=cache, use_cache=True).logits
            finally:
                uncompile_decoder(model)
            graphs.append(len(counter.graphs))
            keep = inputs["attention_mask"].bool()
            torch.testing.assert_close(got[keep], eager[keep], rtol=0, atol=1e-4)
            assert (eager[keep] - baseline[keep]).abs().max() > 1e-2
    remove_shortv(model)
    assert graphs == [1, 1, 2]


def test_cuda_graph_recipe_with_inductor_reduce_overhead_equals_eager(device):
    """The recipe as a user runs it (inductor, mode="reduce-overhead"): the eager ShortV tokens, three times from
    one cache (compile and warm-up, CUDA graph recording, replay). On CUDA (``SHORTV_TEST_DEVICE=cuda``, which the
    GPU check runs) inductor must not skip a CUDA graph; on a CPU it skips only the CUDA graph itself."""
    from torch._dynamo.utils import counters

    model = build_model("llava", attn_implementation="sdpa", init_std=0.2).to(device)
    apply_shortv(model, FROZEN)
    inputs = build_inputs(model, "llava", batch_layouts=SAME_BUCKET[0]).to(device)
    expected = _generate(model, inputs)
    compile_decoder(model)
    cache = static_cache(model, 2, inputs["input_ids"].shape[1] + 4)
    counters.clear()
    try:
        for _ in range(3):
            cache.reset()
            assert torch.equal(_generate(model, inputs, cache=cache), expected)
    finally:
        uncompile_decoder(model)
    remove_shortv(model)
    if device.type == "cuda":
        assert counters["inductor"]["cudagraph_skips"] == 0


def test_compile_decoder_is_undone_and_pad_to_bucket_checks_length():
    model = build_model("llama", init_std=0.2)
    stack = decoder_stack(model)
    assert stack is model.model
    compile_decoder(model, backend="eager")
    assert "forward" in stack.__dict__ and model.generation_config.disable_compile
    uncompile_decoder(model)
    assert "forward" not in stack.__dict__ and not model.generation_config.disable_compile
    ids = torch.tensor([[5, 6, 7]])
    padded = pad_to_bucket(5, ids, visual_mask=torch.tensor([[False, True, False]]), pad_token_id=1)
    assert padded["input_ids"].tolist() == [[1, 1, 5, 6, 7]]
    assert padded["attention_mask"].tolist() == [[0, 0, 1, 1, 1]]
    assert padded["visual_mask"].tolist() == [[False, False, False, True, False]]
    with pytest.raises(ValueError, match="more than the bucket's 2"):
        pad_to_bucket(2, ids)


@pytest.mark.parametrize("family", ["llama", "qwen2_vl"])
def test_static_cache_prefill_equals_uncached_shortv(family):
    """Eager, no padding (transformers passes no mask, the frozen layer builds the causal one): a static cache's
    length counter is a tensor that the cache update advances in place, and must be read before it."""
    model = build_model(family, init_std=0.2)
    inputs = build_inputs(model, family, batch_layouts=[ONE_IMAGE, ONE_IMAGE])
    kwargs = {"visual_mask": inputs.visual_mask} if family == "llama" else {}
    apply_shortv(model, FROZEN)
    with torch.no_grad():
        expected = model(**inputs, **kwargs, use_cache=False).logits
        got = model(**inputs, **kwargs, cache=static_cache(model, 2, inputs["input_ids"].shape[1] + 2)).logits
    remove_shortv(model)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
