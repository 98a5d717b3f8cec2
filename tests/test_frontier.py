"""What is particular to the hybrid and KV-sharing families: Qwen3.5/3.6's Gated DeltaNet layers (rows, cache,
chunked prefill, mixed layer kinds) and Gemma 4's KV sharing, MoE branch, per-layer inputs and layer scalars. The
checks every family passes (fast == reference, batches, generate, remove, rows of q/o/MLP) are in test_parity.py."""

from contextlib import nullcontext

import pytest
import torch
from row_counts import rows_fed
from tiny_models import build_inputs, build_model, default_layouts, reset_state

from shortv import ShortVConfig, apply_shortv, disable_shortv, remove_shortv, using_visual_mask
from shortv.registry import fast_layer_for, find_decoder_layers


def logits(model, inputs, **kwargs):
    reset_state(model)
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def fast_reference_baseline(model, inputs, layers, **kwargs):
    """Logits at the non-padding positions: fast, reference, unpatched."""
    keep = inputs["attention_mask"].bool()
    out = []
    for mode in ("fast", "reference"):
        apply_shortv(model, ShortVConfig(layers, mode=mode))
        out.append(logits(model, inputs, **kwargs)[keep])
    remove_shortv(model)
    return out[0], out[1], logits(model, inputs, **kwargs)[keep]


def count_rows(model, inputs, modules, layers):
    """Rows each of ``modules`` (name -> module) is fed in one forward with ``layers`` frozen (fast)."""
    apply_shortv(model, layers)
    try:
        with rows_fed(modules) as rows:
            logits(model, inputs)
    finally:
        remove_shortv(model)
    return rows


@pytest.fixture(scope="module", params=["qwen3_5", "qwen3_5_moe"])
def hybrid(request):
    model = build_model(request.param, init_std=0.2)
    return request.param, model, build_inputs(model, request.param, batch_layouts=default_layouts(request.param))


# ---------------------------------------------------------------------------------------------------------------
# Qwen3.5 / 3.6: Gated DeltaNet layers
# ---------------------------------------------------------------------------------------------------------------
def test_layer_kinds_each_get_their_fast_layer(hybrid):
    _, model, _ = hybrid
    fast = fast_layer_for(model)
    modules = [fast._for(layer).anatomy.module for layer in find_decoder_layers(model)]
    assert modules == ["linear_attention", "prenorm", "linear_attention", "prenorm"]
    layer = find_decoder_layers(model)[0]
    layer.block_type = "mamba"
    try:
        assert "layer type 'mamba' (block_type); the fast layer supports linear_attention, full_attention" in \
            fast.unsupported_reason(layer)
        with pytest.raises(ValueError, match="decoder layer 0: .*layer type 'mamba'"):
            apply_shortv(model, [0])
    finally:
        layer.block_type = "linear_attention"


def test_linear_attention_output_and_mlp_see_only_text_rows(hybrid):
    family, model, inputs = hybrid
    layer = find_decoder_layers(model)[2]
    mixer = layer.linear_attn
    modules = {name: getattr(mixer, name) for name in ("in_proj_qkv", "in_proj_b", "in_proj_a", "in_proj_z", "norm",
                                                        "out_proj")}
    modules["mlp"] = layer.mlp
    if family == "qwen3_5_moe":
        modules.update(router=layer.mlp.gate, experts=layer.mlp.experts, shared_expert=layer.mlp.shared_expert)
    n_tokens = inputs["input_ids"].numel()
    n_text = n_tokens - int(inputs.visual_mask.sum())
    unpatched = count_rows(model, inputs, modules, [])
    frozen = count_rows(model, inputs, modules, [2])
    heads = mixer.num_v_heads  # the gated norm runs per value head
    all_tokens = {"in_proj_qkv": n_tokens, "in_proj_b": n_tokens, "in_proj_a": n_tokens}
    assert unpatched == {**all_tokens, "in_proj_z": n_tokens, "norm": n_tokens * heads, "out_proj": n_tokens,
                         **{name: n_tokens for name in modules if name not in all_tokens | {"norm": 0, "in_proj_z": 0,
                                                                                            "out_proj": 0}}}
    assert frozen == {**all_tokens, "in_proj_z": n_text, "norm": n_text * heads, "out_proj": n_text,
                      **{name: n_text for name in modules if name not in all_tokens | {"norm": 0, "in_proj_z": 0,
                                                                                       "out_proj": 0}}}
    assert n_text < n_tokens


def _linear_states(cache, layers):
    return {index: (cache.layers[index].conv_states[0].clone(), cache.layers[index].recurrent_states[0].clone())
            for index in layers}


def _prefill_states(model, inputs, frozen, mode):
    apply_shortv(model, ShortVConfig(frozen, mode="fast" if mode == "off" else mode))
    reset_state(model)
    try:
        with torch.no_grad(), (disable_shortv(model) if mode == "off" else nullcontext()):
            return _linear_states(model(**inputs, use_cache=True).cache, [0, 2])
    finally:
        remove_shortv(model)


def test_conv_and_recurrent_cache_after_prefill_is_bit_identical_to_reference(hybrid):
    family, model, inputs = hybrid
    # A frozen linear layer fed the same input leaves exactly the state the reference path (and the unpatched
    # layer) leaves: every token still goes through the convolution and the delta rule.
    states = {mode: _prefill_states(model, inputs, [2], mode) for mode in ("fast", "reference", "off")}
    for index in (0, 2):
        for name, fast, reference, off in zip(("conv", "recurrent"), *(states[m][index] for m in states)):
            assert torch.equal(fast, reference) and torch.equal(fast, off), (family, index, name)
    # Two frozen linear layers: the first one's state is bit-exact; the second one's input text rows went through
    # the first one's text-row GEMMs, so its state agrees to rounding (and moved away from the unpatched state).
    states = {mode: _prefill_states(model, inputs, [0, 2], mode) for mode in ("fast", "reference", "off")}
    assert all(torch.equal(a, b) for a, b in zip(states["fast"][0], states["reference"][0]))
    for fast, reference in zip(states["fast"][2], states["reference"][2]):
        torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)
    assert (states["fast"][2][1] - states["off"][2][1]).abs().max() > 1e-3

    def generate(mode):
        apply_shortv(model, ShortVConfig([0, 2], mode=mode))
        reset_state(model)
        try:
            with torch.no_grad():
                return model.generate(**inputs, max_new_tokens=3, do_sample=False)
        finally:
            remove_shortv(model)

    assert torch.equal(generate("fast"), generate("reference"))  # decode steps continue from that state


def test_frozen_layers_of_both_kinds_and_a_layer_between(hybrid):
    _, model, inputs = hybrid
    fast, reference, baseline = fast_reference_baseline(model, inputs, [0, 1, 3])  # linear, full, full
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)
    assert (fast - baseline).abs().max() > 1e-3


def test_hooks_on_a_frozen_linear_attention_mixer_see_zero_visual_rows(hybrid):
    _, model, inputs = hybrid
    mixer = find_decoder_layers(model)[2].linear_attn
    seen = {}
    handle = mixer.register_forward_hook(lambda module, args, output: seen.setdefault("out", []).append(output))
    try:
        for mode in ("fast", "reference"):
            apply_shortv(model, ShortVConfig([2], mode=mode))
            logits(model, inputs)
    finally:
        handle.remove()
        remove_shortv(model)
    fast, reference = seen["out"]
    assert fast.shape == reference.shape == (*inputs["input_ids"].shape, model.config.text_config.hidden_size)
    assert not fast[inputs.visual_mask].any()  # a frozen layer adds nothing to visual tokens
    text = ~inputs.visual_mask
    torch.testing.assert_close(fast[text], reference[text], rtol=0, atol=1e-5)


def test_patched_hybrid_model_pickles_and_deep_copies():
    """The per-kind fast layer (`LayerKinds`) travels with the model like a single-anatomy one."""
    import copy
    import io

    model = build_model("qwen3_5", init_std=0.2)
    apply_shortv(model, [1, 2])
    buffer = io.BytesIO()
    torch.save(model, buffer)  # before the first forward (transformers' output-capturing hooks are closures)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    twin = copy.deepcopy(model)
    inputs = build_inputs(model, "qwen3_5", batch_layouts=default_layouts("qwen3_5", batch_size=2))
    patched = logits(model, inputs)
    assert torch.equal(logits(loaded, inputs), patched) and torch.equal(logits(twin, inputs), patched)
    with disable_shortv(model):
        assert not torch.equal(logits(model, inputs), patched)
    remove_shortv(model)


def _causal_lm():
    """A bare Qwen3.5 language model (the bench shape's class) from the tiny family's text config."""
    from transformers import Qwen3_5ForCausalLM

    text = build_model("qwen3_5").config.text_config
    torch.manual_seed(0)
    text.initializer_range = 0.2
    return Qwen3_5ForCausalLM._from_config(text, attn_implementation="sdpa", dtype=torch.float32).eval()


def test_chunked_prefill_through_the_conv_and_recurrent_cache():
    """A second prefill chunk holding image tokens continues the frozen layer's state from the cache."""
    from transformers import DynamicCache

    model = _causal_lm()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 180, (2, 30), generator=generator)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[0, 4:12], mask[0, 18:26], mask[1, 20:27] = True, True, True
    split = 15
    results = {}
    for mode in ("fast", "reference"):
        apply_shortv(model, ShortVConfig([0, 1, 2], mode=mode))
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids[:, :split], cache=cache, visual_mask=mask[:, :split], use_cache=True)
            second = model(input_ids=ids[:, split:], cache=cache, visual_mask=mask[:, split:], use_cache=True).logits
        results[mode] = (second, _linear_states(cache, [0, 2]))
        remove_shortv(model)
    torch.testing.assert_close(results["fast"][0], results["reference"][0], rtol=0, atol=1e-5)
    assert all(torch.equal(results["fast"][1][0][k], results["reference"][1][0][k]) for k in range(2))
    with torch.no_grad():
        whole = model(input_ids=ids, visual_mask=None).logits[:, split:]
    assert (results["fast"][0] - whole).abs().max() > 1e-3  # freezing changed the second chunk's predictions


# ---------------------------------------------------------------------------------------------------------------
# Gemma 4: KV sharing, MoE branch, per-layer inputs, layer scalars
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma4():
    model = build_model("gemma4", init_std=0.2)
    return model, build_inputs(model, "gemma4", batch_layouts=default_layouts("gemma4"))


def test_gemma4_frozen_kv_sharing_layer(gemma4):
    model, inputs = gemma4
    layers = find_decoder_layers(model)
    assert layers[3].self_attn.is_kv_shared_layer and layers[1].self_attn.store_full_length_kv
    fast, reference, baseline = fast_reference_baseline(model, inputs, [0, 3])
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)
    assert (fast - baseline).abs().max() > 1e-3
    # The sharing layer's queries are text rows only; it has no key/value projections of its own.
    rows = count_rows(model, inputs, {"q_proj": layers[3].self_attn.q_proj, "o_proj": layers[3].self_attn.o_proj},
                      [3])
    n_text = inputs["input_ids"].numel() - int(inputs.visual_mask.sum())
    assert rows == {"q_proj": n_text, "o_proj": n_text}


def test_gemma4_generate_with_frozen_kv_sharing_layer_on_trailing_positions(gemma4):
    """generate() runs the KV-sharing layers on the last prompt position only; a frozen one there still works,
    also when that position is declared visual."""
    model, inputs = gemma4
    seen = []
    handle = find_decoder_layers(model)[3].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    outputs = {}
    try:
        for mode in ("fast", "reference"):
            apply_shortv(model, ShortVConfig([2, 3], mode=mode))
            with torch.no_grad():
                outputs[mode] = model.generate(**inputs, max_new_tokens=4, do_sample=False)
                last_visual = inputs.visual_mask.clone()
                last_visual[:, -1] = True
                with using_visual_mask(model, last_visual):
                    outputs[mode + "-last-visual"] = logits(model, inputs, logits_to_keep=1)
    finally:
        handle.remove()
        remove_shortv(model)
    assert seen[0] == 1  # the prefill reached layer 3 with the last position only
    assert torch.equal(outputs["fast"], outputs["reference"])
    torch.testing.assert_close(outputs["fast-last-visual"], outputs["reference-last-visual"], rtol=0, atol=1e-5)


def test_gemma4_freezing_after_the_last_kv_producer_is_free():
    """With layers 2-3 reusing layers 0-1's keys/values, no text token reads the visual states leaving layers 1-3:
    freezing them changes no text position's output, and the fast layer skips their visual rows."""
    model = build_model("gemma4", init_std=0.2, text_overrides={"num_kv_shared_layers": 2})
    inputs = build_inputs(model, "gemma4", batch_layouts=default_layouts("gemma4"))
    fast, reference, baseline = fast_reference_baseline(model, inputs, [1, 2, 3])
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)
    text = ~inputs.visual_mask[inputs["attention_mask"].bool()]
    torch.testing.assert_close(fast[text], baseline[text], rtol=0, atol=1e-5)
    assert (fast[~text] - baseline[~text]).abs().max() > 1e-3  # the visual positions' own predictions do move
    fast, _, baseline = fast_reference_baseline(model, inputs, [0])
    assert (fast - baseline).abs().max() > 1e-3  # layer 0 feeds layer 1's keys and values: not free


def test_gemma4_moe_branch_and_per_layer_input_see_only_text_rows(gemma4):
    model, inputs = gemma4
    layer = find_decoder_layers(model)[1]
    modules = {"router": layer.router, "experts": layer.experts, "per_layer_input_gate": layer.per_layer_input_gate,
               "per_layer_projection": layer.per_layer_projection, "mlp": layer.mlp}
    n_tokens = inputs["input_ids"].numel()
    n_text = n_tokens - int(inputs.visual_mask.sum())
    assert count_rows(model, inputs, modules, []) == dict.fromkeys(modules, n_tokens)
    assert count_rows(model, inputs, modules, [1]) == dict.fromkeys(modules, n_text)


def test_gemma4_layer_scalar_and_per_layer_input_leave_visual_rows_alone(gemma4):
    model, inputs = gemma4
    layer = find_decoder_layers(model)[1]
    assert layer.layer_scalar.item() != 1.0 and layer.hidden_size_per_layer_input
    seen = {}
    handle = layer.register_forward_hook(lambda m, args, kwargs, out: seen.update(inp=args[0], out=out),
                                         with_kwargs=True)
    try:
        for mode in ("fast", "reference"):
            apply_shortv(model, ShortVConfig([1], mode=mode))
            logits(model, inputs)
            seen[mode] = seen.pop("inp"), seen.pop("out")
    finally:
        handle.remove()
        remove_shortv(model)
    visual, text = inputs.visual_mask, inputs["attention_mask"].bool() & ~inputs.visual_mask
    for mode in ("fast", "reference"):
        layer_in, layer_out = seen[mode]
        assert torch.equal(layer_out[visual], layer_in[visual])
    torch.testing.assert_close(seen["fast"][1][text], seen["reference"][1][text], rtol=0, atol=1e-5)


def test_gemma4_without_optional_branches():
    """No MoE branch, no per-layer inputs, no KV sharing, separate v_proj on every layer: the plain sandwich path."""
    model = build_model("gemma4", init_std=0.2, text_overrides=dict(
        enable_moe_block=False, num_kv_shared_layers=0, attention_k_eq_v=False, use_bidirectional_attention=None))
    inputs = build_inputs(model, "gemma4", batch_layouts=default_layouts("gemma4"))
    fast, reference, baseline = fast_reference_baseline(model, inputs, [1, 2])
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)
    assert (fast - baseline).abs().max() > 1e-3


@pytest.mark.parametrize("version", ["4_6", "4_7"])
def test_minicpmv_runs_the_qwen35_text_model_fast(version):
    """MiniCPM-V 4.6 / 4.7 use Qwen3.5's text model: registry rows only. Checked on the decoder path with image
    placeholder ids (the NaViT vision tower is not exercised here)."""
    import transformers as tf

    from tiny_models import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID

    config_class = getattr(tf, f"MiniCPMV{version}Config")
    text = build_model("qwen3_5").config.text_config.to_dict()
    config = config_class(text_config=text, image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID,
                          vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2))
    torch.manual_seed(0)
    model = getattr(tf, f"MiniCPMV{version}ForConditionalGeneration")._from_config(
        config, attn_implementation="sdpa", dtype=torch.float32).eval()
    ids = torch.randint(3, 180, (2, 20), generator=torch.Generator().manual_seed(0))
    ids[0, 4:10], ids[1, 8:15] = IMAGE_TOKEN_ID, IMAGE_TOKEN_ID
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert fast_layer_for(model) is not None
    fast, reference, baseline = fast_reference_baseline(model, inputs, [1, 2])
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)
    assert (fast - baseline).abs().max() > 1e-3


def test_lc_plot_marks_the_layer_kinds(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from shortv.contribution import LCResult
    from shortv.plots import plot_layer_contribution
    from shortv.registry import layer_types

    model = build_model("qwen3_5")
    kinds = layer_types(model)
    assert kinds == ["linear_attention", "full_attention", "linear_attention", "full_attention"]
    lc = LCResult(num_layers=4, token_types=("visual",), sample_ids=["a"], per_sample={"visual": [[0.3, 0.1, 0.2, 0]]})
    written = []
    real_savefig = plt.Figure.savefig

    def savefig(figure, *args, **kwargs):  # read the x axis as the figure is written
        axes = figure.axes[0]
        written.append(([tick.get_text() for tick in axes.get_xticklabels()], axes.get_xlabel()))
        return real_savefig(figure, *args, **kwargs)

    plt.Figure.savefig = savefig
    try:
        assert plot_layer_contribution(lc, tmp_path / "lc.png", chosen=[3], layer_types=kinds).stat().st_size > 0
        plot_layer_contribution(lc, tmp_path / "plain.png", layer_types=["full_attention"] * 4)
    finally:
        plt.Figure.savefig = real_savefig
    assert written[0] == (["0\nL", "1\nF", "2\nL", "3\nF"],
                          "decoder layer and kind (F = full_attention, L = linear_attention)")
    assert written[1] == (["0", "1", "2", "3"], "decoder layer")  # one kind: nothing to mark
