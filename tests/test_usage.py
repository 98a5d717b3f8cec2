"""A patched model behaves like a normal nn.Module under everyday use: deepcopy, pickle, .to(), quantization,
attention outputs and hooks, calls into inner modules, beams, chunked prefill."""

import copy
import io

import pytest
import torch
from tiny_models import build_inputs, build_model, default_layouts, reset_state

from shortv import ShortVConfig, apply_shortv, disable_shortv, get_shortv_state, remove_shortv, using_visual_mask
from shortv.registry import find_decoder_layers

FROZEN = [1, 2]


@pytest.fixture(scope="module")
def llava():
    model = build_model("llava", init_std=0.2)
    inputs = build_inputs(model, "llava", batch_layouts=default_layouts("llava"))
    return model, inputs


@pytest.fixture(scope="module")
def llama():
    model = build_model("llama", init_std=0.2)
    inputs = build_inputs(model, "llama", batch_layouts=default_layouts("llama", batch_size=2))
    return model, inputs


def logits(model, inputs, **kwargs):
    reset_state(model)
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def greedy(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, do_sample=False, **kwargs)


def reference_logits(model, inputs, **kwargs):
    apply_shortv(model, ShortVConfig(FROZEN, mode="reference"))
    try:
        return logits(model, inputs, **kwargs)
    finally:
        remove_shortv(model)


# ---------------------------------------------------------------------------------------------------------------
# copies
# ---------------------------------------------------------------------------------------------------------------
def test_deepcopy_is_an_independent_patched_model(llava):
    model, inputs = llava
    baseline = logits(model, inputs)
    apply_shortv(model, FROZEN)
    try:
        patched = logits(model, inputs)
        twin = copy.deepcopy(model)
        assert torch.equal(logits(twin, inputs), patched)
        state = get_shortv_state(twin)
        assert state is not get_shortv_state(model)
        assert all(module is not original for (module, _, _), (original, _, _)
                   in zip(state.patched, get_shortv_state(model).patched))
        # the copy's frozen layers run the copy's weights
        with torch.no_grad():
            find_decoder_layers(twin)[FROZEN[0]].mlp.down_proj.weight.mul_(3)
        changed = logits(twin, inputs)
        assert not torch.equal(changed, patched)
        assert torch.equal(logits(model, inputs), patched)
        assert torch.equal(greedy(twin, inputs), greedy(twin, inputs))
        # removing ShortV from the copy leaves the original patched
        remove_shortv(twin)
        assert get_shortv_state(model) is not None and torch.equal(logits(model, inputs), patched)
        with disable_shortv(model):
            assert torch.equal(logits(model, inputs), baseline)
    finally:
        remove_shortv(model)


def test_deepcopy_generates_with_its_own_weights_and_converts_dtype(llava):
    model, inputs = llava
    apply_shortv(model, FROZEN)
    try:
        twin = copy.deepcopy(model)
        with torch.no_grad():
            for parameter in find_decoder_layers(twin).parameters():
                parameter.zero_()
        assert not torch.equal(greedy(twin, inputs), greedy(model, inputs))
        half = copy.deepcopy(model).to(torch.bfloat16)
        bf16_inputs = {key: value.to(torch.bfloat16) if value.is_floating_point() else value
                       for key, value in inputs.items()}
        assert logits(half, bf16_inputs).dtype == torch.bfloat16
    finally:
        remove_shortv(model)


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_pickle_and_torch_save_round_trip(family):
    # transformers' own output-capturing hooks, installed by the first vision-tower forward, make a LLaVA
    # unpicklable with or without ShortV; so the model is saved before it runs
    model = build_model(family, init_std=0.2)
    apply_shortv(model, FROZEN)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    inputs = build_inputs(model, family, batch_layouts=default_layouts(family))
    mask = {"visual_mask": inputs.visual_mask} if family == "llama" else {}
    patched = logits(model, inputs, **mask)
    assert get_shortv_state(loaded).config.layers == FROZEN
    assert torch.equal(logits(loaded, inputs, **mask), patched)
    with disable_shortv(model):
        assert not torch.equal(logits(model, inputs, **mask), patched)
    remove_shortv(loaded)
    with disable_shortv(model):
        assert torch.equal(logits(loaded, inputs, **mask), logits(model, inputs, **mask))


def test_dynamic_quantization_quantizes_frozen_layers_too(llama):
    model, inputs = llama
    apply_shortv(model, FROZEN)
    try:
        quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        layer = find_decoder_layers(quantized)[FROZEN[0]]
        assert type(layer.self_attn.q_proj).__name__ == "Linear" and "quantized" in type(layer.self_attn.q_proj).__module__
        mask = {"visual_mask": inputs.visual_mask}
        fast = logits(quantized, inputs, **mask)
        assert not torch.equal(fast, logits(model, inputs, **mask))  # the quantized weights are really used
        with disable_shortv(quantized):
            assert not torch.equal(logits(quantized, inputs, **mask), fast)
        # (fast != reference here: dynamic quantization scales activations per call, and the fast path feeds q_proj
        # the text rows only) -- but visual states still leave the quantized frozen layer exactly as they entered
        seen = {}
        layer.register_forward_hook(lambda module, args, kwargs, output: seen.update(input=args[0], output=output),
                                    with_kwargs=True)
        logits(quantized, inputs, **mask)
        assert torch.equal(seen["output"][inputs.visual_mask], seen["input"][inputs.visual_mask])
    finally:
        remove_shortv(model)


# ---------------------------------------------------------------------------------------------------------------
# attention outputs and hooks
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", ["mixed layouts", "batch 1"])  # per-sample and shared layout routes
def test_output_attentions_one_entry_per_layer_with_text_query_rows(batch):
    model = build_model("llava", attn_implementation="eager", init_std=0.2)
    one = [dict(n_text_before=3, images=1, n_text_after=5)]
    layouts = default_layouts("llava") if batch == "mixed layouts" else one
    inputs = build_inputs(model, "llava", batch_layouts=layouts)
    apply_shortv(model, ShortVConfig(FROZEN, mode="reference"))
    reference = model(**inputs, output_attentions=True).attentions
    apply_shortv(model, FROZEN)
    fast = model(**inputs, output_attentions=True).attentions
    text = inputs["attention_mask"].bool() & ~inputs.visual_mask
    assert len(fast) == len(reference) == model.config.text_config.num_hidden_layers
    for index, (got, expected) in enumerate(zip(fast, reference)):
        assert got.shape == expected.shape
        rows = got.transpose(1, 2)
        torch.testing.assert_close(rows[text], expected.transpose(1, 2)[text], rtol=0, atol=1e-6)
        assert (rows[inputs.visual_mask] == 0).all() == (index in FROZEN)
    # decode steps report as many layers as the prefill
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_attentions=True,
                         return_dict_in_generate=True)
    assert {len(step) for step in out.attentions} == {model.config.text_config.num_hidden_layers}
    remove_shortv(model)


def test_hooks_on_a_frozen_layers_attention_see_zero_visual_rows(llava):
    model, inputs = llava
    seen = []
    attention = find_decoder_layers(model)[FROZEN[0]].self_attn
    handle = attention.register_forward_hook(lambda module, args, output: seen.append(output[0]))
    apply_shortv(model, FROZEN)
    try:
        logits(model, inputs)
    finally:
        remove_shortv(model)
        handle.remove()
    assert len(seen) == 1 and seen[0].shape[:2] == inputs["input_ids"].shape
    assert (seen[0][inputs.visual_mask] == 0).all()
    assert (seen[0][~inputs.visual_mask & inputs["attention_mask"].bool()].abs().sum(-1) > 0).all()


# ---------------------------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------------------------
def test_inner_model_and_direct_forward_calls_freeze(llava):
    model, inputs = llava
    with torch.no_grad():
        unpatched = model.model(**inputs).last_hidden_state
        apply_shortv(model, ShortVConfig(FROZEN, mode="reference"))
        reference = model.model(**inputs).last_hidden_state
        apply_shortv(model, FROZEN)
        try:
            inner = model.model(**inputs).last_hidden_state
            direct = model.forward(**inputs).logits  # e.g. PEFT calls forward, skipping the top-level hooks
            expected = logits(model, inputs)
        finally:
            remove_shortv(model)
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(inner[keep], reference[keep], rtol=0, atol=1e-5)
    assert (inner[keep] - unpatched[keep]).abs().max() > 1e-3
    torch.testing.assert_close(direct, expected, rtol=0, atol=0)


def test_language_model_called_with_embeddings_needs_a_mask(llava):
    model, inputs = llava
    language_model = model.model.language_model
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(inputs["input_ids"].clamp(max=model.config.text_config.vocab_size - 1))
        apply_shortv(model, ShortVConfig(FROZEN, mode="reference"))
        reference = language_model(inputs_embeds=embeds, visual_mask=inputs.visual_mask).last_hidden_state
        apply_shortv(model, FROZEN)
        try:
            with pytest.raises(RuntimeError, match="cannot tell which positions of this forward are visual"):
                language_model(inputs_embeds=embeds)
            fast = language_model(inputs_embeds=embeds, visual_mask=inputs.visual_mask).last_hidden_state
            assert torch.equal(model.model(**inputs).last_hidden_state, model.model(**inputs).last_hidden_state)
        finally:
            remove_shortv(model)
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)


def test_layer_called_directly_fails_loudly(llama):
    model, inputs = llama
    apply_shortv(model, FROZEN)
    try:
        with pytest.raises(RuntimeError, match="outside a forward of the model"):
            find_decoder_layers(model)[FROZEN[0]](torch.zeros(1, 3, model.config.hidden_size))
    finally:
        remove_shortv(model)


# ---------------------------------------------------------------------------------------------------------------
# explicit masks: beams and chunked prefill
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("expansion", [{"num_beams": 2}, {"num_beams": 3, "num_return_sequences": 2},
                                       {"do_sample": True, "num_return_sequences": 2, "top_k": 1}])
def test_explicit_mask_is_expanded_like_generate_expands_inputs(llama, expansion):
    model, inputs = llama
    mask = inputs.visual_mask
    kwargs = {"max_new_tokens": 4, "do_sample": False, **expansion}
    results = {}
    for mode in ("reference", "fast"):
        apply_shortv(model, ShortVConfig(FROZEN, mode=mode))
        torch.manual_seed(0)
        with torch.no_grad():
            results[mode] = model.generate(**inputs, visual_mask=mask, **kwargs)
    with disable_shortv(model), torch.no_grad():
        torch.manual_seed(0)
        baseline = model.generate(**inputs, **kwargs)
    remove_shortv(model)
    assert torch.equal(results["fast"], results["reference"])
    assert results["fast"].shape == baseline.shape


def test_chunked_prefill_accepts_per_call_or_absolute_masks(llama):
    from transformers import DynamicCache

    model, inputs = llama
    mask, ids, attention = inputs.visual_mask, inputs["input_ids"], inputs["attention_mask"]
    split = ids.shape[1] // 2
    apply_shortv(model, FROZEN)
    try:
        whole = logits(model, inputs, visual_mask=mask)
        for second_mask in (mask[:, split:], mask):  # this call's tokens, or every position so far
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                model(input_ids=ids[:, :split], attention_mask=attention[:, :split], cache=cache,
                      visual_mask=mask[:, :split], use_cache=True)
                second = model(input_ids=ids[:, split:], attention_mask=attention, cache=cache,
                               visual_mask=second_mask, use_cache=True).logits
            torch.testing.assert_close(second, whole[:, split:], rtol=0, atol=1e-5)
        with using_visual_mask(model, mask):  # a prompt-wide mask covers both chunks by absolute position
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                model(input_ids=ids[:, :split], attention_mask=attention[:, :split], cache=cache, use_cache=True)
                second = model(input_ids=ids[:, split:], attention_mask=attention, cache=cache,
                               use_cache=True).logits
            torch.testing.assert_close(second, whole[:, split:], rtol=0, atol=1e-5)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids[:, :split], attention_mask=attention[:, :split], cache=cache,
                  visual_mask=mask[:, :split], use_cache=True)
            with pytest.raises(ValueError, match=r"it must be \(2, \d+\) or \(2, \d+\): one bool per token"):
                model(input_ids=ids[:, split:], attention_mask=attention, cache=cache,
                      visual_mask=mask[:, 1:], use_cache=True)
    finally:
        remove_shortv(model)
    assert not torch.equal(logits(model, inputs), whole)  # unpatched: freezing did something


def test_training_gradients_match_reference_with_and_without_checkpointing(llava):
    model, inputs = llava
    frozen_mlp = find_decoder_layers(model)[FROZEN[0]].mlp.down_proj.weight
    gradients = {}
    model.train()
    try:
        for name, mode, checkpointing in [("reference", "reference", False), ("fast", "fast", False),
                                          ("fast+checkpointing", "fast", True)]:
            if checkpointing:
                model.gradient_checkpointing_enable()
            apply_shortv(model, ShortVConfig(FROZEN, mode=mode))
            model.zero_grad()
            model(**inputs, use_cache=False).logits[inputs["attention_mask"].bool()].sum().backward()
            gradients[name] = frozen_mlp.grad.clone()
            remove_shortv(model)
        model.zero_grad()
        model(**inputs, use_cache=False).logits[inputs["attention_mask"].bool()].sum().backward()
        unpatched = frozen_mlp.grad.clone()
    finally:
        model.gradient_checkpointing_disable()
        model.zero_grad()
        model.eval()
    torch.testing.assert_close(gradients["fast"], gradients["reference"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gradients["fast+checkpointing"], gradients["fast"], rtol=0, atol=0)
    assert not torch.allclose(gradients["fast"], unpatched, atol=1e-3)  # the frozen layer's MLP sees text rows only


def test_a_generated_placeholder_id_is_text(llava):
    """Decoding a token whose id is the image placeholder: it is embedded as text, so it is not frozen."""
    from transformers import DynamicCache

    model, inputs = llava
    single = inputs.sample(0)
    step = torch.full((1, 1), model.config.image_token_id)
    mask = torch.cat([single["attention_mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
    results = {}
    apply_shortv(model, FROZEN)
    try:
        for name, step_mask in (("derived", {}), ("declared text", {"visual_mask": torch.zeros(1, 1, dtype=torch.bool)}),
                                ("declared visual", {"visual_mask": torch.ones(1, 1, dtype=torch.bool)})):
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                model(**single, cache=cache, use_cache=True)
                results[name] = model(input_ids=step, attention_mask=mask, cache=cache, use_cache=True,
                                      **step_mask).logits
    finally:
        remove_shortv(model)
    assert torch.equal(results["derived"], results["declared text"])
    assert not torch.equal(results["derived"], results["declared visual"])
