"""Fast frozen layers == reference (run-then-restore) on tiny models of every supported family."""

import pytest
import torch
from row_counts import rows_fed
from tiny_models import (
    FAMILIES,
    TEXT_ONLY_FAMILIES,
    build_inputs,
    build_model,
    default_layouts,
    reset_state,
)

from shortv import (
    ShortVConfig,
    apply_shortv,
    disable_shortv,
    get_shortv_state,
    remove_shortv,
)

FROZEN = [1, 2]  # of 4 decoder layers: a frozen layer feeds another frozen layer and an unfrozen one


def decoder_layers(model):
    from shortv.registry import find_decoder_layers

    return find_decoder_layers(model)


def run(model, inputs, **kwargs):
    reset_state(model)
    extra = {"visual_mask": inputs.visual_mask} if inputs.family in TEXT_ONLY_FAMILIES else {}
    with torch.no_grad():
        return model(**inputs, **extra, **kwargs).logits


def real(inputs):
    return inputs["attention_mask"].bool()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def tiny(family, device):
    model = build_model(family, attn_implementation="sdpa", init_std=0.2).to(device)
    inputs = build_inputs(model, family, batch_layouts=default_layouts(family), padding_side="left")
    return model, inputs


def test_fast_matches_reference_and_changes_text_logits(tiny, logit_tolerance):
    model, inputs = tiny
    baseline = run(model, inputs)
    apply_shortv(model, ShortVConfig(FROZEN, mode="reference"))
    reference = run(model, inputs)
    apply_shortv(model, ShortVConfig(FROZEN, mode="fast"))
    fast = run(model, inputs)
    remove_shortv(model)
    keep = real(inputs)
    torch.testing.assert_close(fast[keep], reference[keep], **logit_tolerance)
    # Non-triviality: freezing really changes what text tokens predict.
    text_after_image = keep & ~inputs.visual_mask
    assert (fast[text_after_image] - baseline[text_after_image]).abs().max() > 1e-3


def test_derived_visual_mask_is_the_ground_truth(tiny, family):
    model, inputs = tiny
    seen = []
    apply_shortv(model, FROZEN)
    layer = decoder_layers(model)[FROZEN[0]]
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(get_shortv_state(model).layout))
    try:
        run(model, inputs)
    finally:
        handle.remove()
        remove_shortv(model)
    assert torch.equal(seen[0].visual, inputs.visual_mask)
    assert get_shortv_state(model) is None


def frozen_layer_input_output(model, inputs, config):
    """Hidden states entering and leaving the first frozen layer in one forward with ``config`` applied."""
    captured = {}

    def capture(module, args, kwargs, output):
        captured["in"] = args[0] if args else kwargs["hidden_states"]
        captured["out"] = output[0] if isinstance(output, tuple) else output

    apply_shortv(model, config)
    handle = decoder_layers(model)[config.layers[0]].register_forward_hook(capture, with_kwargs=True)
    try:
        run(model, inputs)
    finally:
        handle.remove()
        remove_shortv(model)
    return captured["in"], captured["out"]


def test_visual_states_leave_frozen_layer_unchanged(tiny):
    model, inputs = tiny
    entering, leaving = frozen_layer_input_output(model, inputs, ShortVConfig(FROZEN))
    visual, text = inputs.visual_mask, real(inputs) & ~inputs.visual_mask
    assert torch.equal(leaving[visual], entering[visual])
    assert not torch.equal(leaving[text], entering[text])


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_each_sample_in_batch_equals_sample_alone(family, padding_side, device):
    model = build_model(family, attn_implementation="sdpa", init_std=0.2).to(device)
    inputs = build_inputs(model, family, batch_layouts=default_layouts(family), padding_side=padding_side)
    # Batched matmuls and left-padding-shifted RoPE positions round differently; with init_std=0.2 the unpatched
    # model itself agrees with the unpadded run only to ~1e-5 (2e-7 at the default init).
    atol = 1e-4
    apply_shortv(model, FROZEN)
    batched = run(model, inputs)
    for i in range(len(inputs.lengths)):
        alone = inputs.sample(i)
        torch.testing.assert_close(batched[i, inputs.positions(i)], run(model, alone)[0], rtol=0, atol=atol)


def shared_layout_inputs(model, family, batch):
    """``batch`` samples (other token ids, other pixels) with their visual tokens at the same positions."""
    first = build_inputs(model, family, batch_layouts=[dict(n_text_before=3, images=1, n_text_after=5)]).layouts[0]
    inputs = build_inputs(model, family, batch_layouts=[dict(first, seed=first["seed"] + i) for i in range(batch)])
    assert bool((inputs.visual_mask == inputs.visual_mask[:1]).all()) and bool(inputs["attention_mask"].all())
    return inputs


@pytest.mark.parametrize(("batch", "attention"), [(1, "sdpa"), (1, "eager"), (2, "sdpa")])
def test_fast_matches_reference_on_a_shared_layout(family, batch, attention, device, logit_tolerance):
    """Batch 1, or samples of one template: the fast layer takes the shared-layout route (text rows gathered along
    the sequence, no padded grid), in the prompt's forward and in generate's cached steps."""
    model = build_model(family, attn_implementation=attention, init_std=0.2).to(device)
    inputs = shared_layout_inputs(model, family, batch).to(device)
    extra = {"visual_mask": inputs.visual_mask} if family in TEXT_ONLY_FAMILIES else {}
    layouts = []
    apply_shortv(model, ShortVConfig(FROZEN, mode="reference"))
    reference = run(model, inputs)
    with torch.no_grad():
        reset_state(model)
        reference_tokens = model.generate(**inputs, **extra, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    apply_shortv(model, FROZEN)
    handle = decoder_layers(model)[FROZEN[0]].register_forward_pre_hook(
        lambda module, args: layouts.append(get_shortv_state(model).layout))
    fast = run(model, inputs)
    with torch.no_grad():
        reset_state(model)
        fast_tokens = model.generate(**inputs, **extra, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    handle.remove()
    with disable_shortv(model):
        baseline = run(model, inputs)
    remove_shortv(model)
    assert layouts[0].shared_positions is not None and layouts[-1] is None  # decode steps: nothing to freeze
    # The shared route gives the per-sample route's logits bit for bit (checked by hand); against the reference both
    # differ by GEMM rounding on fewer rows, here up to 1.14e-5 (ministral3, eager, batch 1).
    torch.testing.assert_close(fast, reference, rtol=logit_tolerance["rtol"], atol=2 * logit_tolerance["atol"])
    assert torch.equal(fast_tokens, reference_tokens)
    assert (fast[~inputs.visual_mask] - baseline[~inputs.visual_mask]).abs().max() > 1e-3


def test_right_padding_and_eager_attention(family, device, logit_tolerance):
    model = build_model(family, attn_implementation="eager", init_std=0.2).to(device)
    inputs = build_inputs(model, family, batch_layouts=default_layouts(family), padding_side="right", seed=3)
    apply_shortv(model, ShortVConfig(FROZEN, mode="reference"))
    reference = run(model, inputs)
    apply_shortv(model, FROZEN)
    fast = run(model, inputs)
    keep = real(inputs)
    torch.testing.assert_close(fast[keep], reference[keep], **logit_tolerance)


def test_generate_fast_equals_reference_with_kv_cache(tiny):
    model, inputs = tiny
    extra = {"visual_mask": inputs.visual_mask} if inputs.family in TEXT_ONLY_FAMILIES else {}

    def generate():
        reset_state(model)
        with torch.no_grad():
            return model.generate(**inputs, **extra, max_new_tokens=6, do_sample=False, use_cache=True)

    apply_shortv(model, ShortVConfig(FROZEN, mode="reference"))
    reference = generate()
    apply_shortv(model, FROZEN)
    fast = generate()
    with disable_shortv(model):
        baseline = generate()
    remove_shortv(model)
    assert torch.equal(fast, reference)
    assert fast.shape == baseline.shape


def test_empty_config_and_remove_are_bit_identical(tiny):
    model, inputs = tiny
    baseline = run(model, inputs)
    apply_shortv(model, ShortVConfig([]))
    assert torch.equal(run(model, inputs), baseline)
    apply_shortv(model, [0, 3])
    assert not torch.equal(run(model, inputs), baseline)
    with disable_shortv(model):
        assert torch.equal(run(model, inputs), baseline)
    remove_shortv(model)
    assert torch.equal(run(model, inputs), baseline)
    for layer in decoder_layers(model):
        assert "forward" not in layer.__dict__
    assert "generate" not in model.__dict__


def test_fast_path_feeds_only_text_rows(tiny):
    model, inputs = tiny
    layer = decoder_layers(model)[FROZEN[0]]
    modules = {"q_proj": layer.self_attn.q_proj, "k_proj": layer.self_attn.k_proj, "o_proj": layer.self_attn.o_proj,
               "mlp": layer.mlp}
    apply_shortv(model, FROZEN)
    try:
        with rows_fed(modules) as rows:
            run(model, inputs)
    finally:
        remove_shortv(model)
    n_tokens = inputs["input_ids"].numel()
    n_text = n_tokens - int(inputs.visual_mask.sum())
    assert rows == {"q_proj": n_text, "o_proj": n_text, "mlp": n_text, "k_proj": n_tokens}
    assert n_text < n_tokens


@pytest.mark.parametrize(
    ("x_dtype", "angle_dtype"),
    [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
)
def test_rope_rounds_exactly_like_transformers(x_dtype, angle_dtype):
    """The frozen layer's buffer-writing RoPE must be bit-identical to transformers' own formula."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from shortv.frozen.rope import apply_rope as _apply_rope

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 16, generator=generator).to(x_dtype) * 5
    angles = torch.randn(2, 7, 8, generator=generator) * 3
    angles = torch.cat([angles, angles], -1)
    cos, sin = angles.cos().to(angle_dtype), angles.sin().to(angle_dtype)
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    got = _apply_rope(x, cos, sin)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)
    assert not torch.equal(got, x.to(got.dtype))  # the rotation did something

    leaf = x.float().requires_grad_()
    _apply_rope(leaf, cos.float(), sin.float()).sum().backward()  # the autograd fallback records gradients
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


def test_text_frozen_ablation_restores_text_states_and_moves_visual_ones(tiny):
    model, inputs = tiny
    config = ShortVConfig(FROZEN, mode="reference", frozen_tokens="text")
    entering, leaving = frozen_layer_input_output(model, inputs, config)
    text = ~inputs.visual_mask  # padding counts as text
    assert torch.equal(leaving[text], entering[text])
    assert not torch.equal(leaving[inputs.visual_mask], entering[inputs.visual_mask])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partial_interleaved_rope_rounds_exactly_like_glm4v(dtype):
    """GLM-4.1V ropes the first half of each head on interleaved pairs; the rest passes through."""
    from transformers.models.glm4v.modeling_glm4v import apply_rotary_pos_emb

    from shortv.frozen.rope import apply_rope

    generator = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 3, 7, 16, generator=generator) * 5).to(dtype)
    angles = torch.randn(2, 7, 4, generator=generator) * 3
    angles = angles.repeat_interleave(2, dim=-1)  # 8 of 16 dims rotate, pairwise, as GLM's rotary module gives them
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    got = apply_rope(x, cos, sin, "interleaved")
    assert torch.equal(got, expected)
    assert torch.equal(got[..., 8:], x[..., 8:]) and not torch.equal(got[..., :8], x[..., :8])
