"""Fast checks of the tiny model factories themselves (tests/tiny_models/)."""

from __future__ import annotations

import warnings

import pytest
import torch

try:
    from tests import tiny_models as tm
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    import tiny_models as tm

_MODELS: dict = {}


def _model(family: str, attn: str = "sdpa"):
    key = (family, attn)
    if key not in _MODELS:
        _MODELS[key] = tm.build_model(family, attn)
    return _MODELS[key]


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_build_model_shape_and_determinism(family):
    model = _model(family)
    text = getattr(model.config, "text_config", model.config)
    assert model.config.model_type == tm.MODEL_TYPES[family]
    assert not model.training
    stored = text.to_dict()  # Gemma 4's config refuses global reads of per-layer attributes such as head counts
    assert (stored["hidden_size"], stored["num_hidden_layers"]) == (64, 4)
    assert (stored["num_attention_heads"], stored["num_key_value_heads"]) == (4, 2)
    assert stored["vocab_size"] == tm.VOCAB_SIZE
    assert all(p.dtype == torch.float32 for p in model.parameters())
    again = tm.build_model(family, "eager")
    assert again.config._attn_implementation == "eager"
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("family", tm.FAMILIES)
def test_masks_forward_and_batch_parity(family, padding_side):
    model = _model(family)
    inp = tm.build_inputs(model, family, padding_side=padding_side)
    ids, am, vm = inp["input_ids"], inp["attention_mask"], inp.visual_mask
    assert vm.dtype == torch.bool and vm.shape == ids.shape
    assert not (vm & (am == 0)).any()
    assert torch.equal(vm, inp.image_mask | inp.video_mask)
    lengths = am.sum(1).tolist()
    assert lengths == inp.lengths and len(set(lengths)) > 1  # really padded
    n_items = [sum(c for _, _, c in items) for items in inp.visual_items]
    if family in tm.TEXT_ONLY_FAMILIES:
        assert vm.sum(1).tolist() == n_items
    else:
        assert torch.equal(inp.image_mask, ids == tm.IMAGE_TOKEN_ID)
        assert torch.equal(inp.video_mask, ids == tm.VIDEO_TOKEN_ID)
        assert vm.sum(1).tolist() == n_items
    assert (vm.sum(1) > 0).any() and (ids[am == 0] == tm.PAD_ID).all()
    assert (am[:, -1 if padding_side == "left" else 0] == 1).all()

    with torch.no_grad():
        logits = model(**inp).logits
    assert logits.shape == (*ids.shape, tm.VOCAB_SIZE) and torch.isfinite(logits).all()
    for i in range(ids.shape[0]):
        alone = inp.sample(i)
        pos = inp.positions(i)
        assert alone["input_ids"].shape == (1, len(pos))
        assert torch.equal(alone["input_ids"][0], ids[i, pos])
        assert torch.equal(alone.visual_mask[0], vm[i, pos])
        with torch.no_grad():
            single = model(**alone).logits
        torch.testing.assert_close(single[0], logits[i, pos], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_generate_left_padded_matches_alone(family):
    model = _model(family)
    inp = tm.build_inputs(model, family, padding_side="left")
    with torch.no_grad():
        out = model.generate(**inp, max_new_tokens=3, do_sample=False)
        assert out.shape == (len(inp.lengths), inp["input_ids"].shape[1] + 3)
        for i in (0, 1):
            alone = model.generate(**inp.sample(i), max_new_tokens=3, do_sample=False)
            assert torch.equal(alone[0, -3:], out[i, -3:])


def test_visual_token_counts():
    expected = {
        "llava": {(12, 12): 9},
        "llava_next": {(8, 16): 14, (16, 16): 24, (16, 8): 16, (10, 16): 14},
        "llava_onevision": {(12, 12): 21, (12, 24): 30, (24, 12): 33, (24, 24): 51},
        "qwen2_vl": {(16, 16): 4, (16, 24): 6, (24, 24): 9},
        "qwen2_5_vl": {(24, 16): 6, (24, 24): 9},
        "qwen3_vl": {(16, 24): 6, (24, 24): 9},
        "glm4v": {(16, 16): 4, (24, 16): 6},
        "internvl": {1: 4, 3: 12},
        "smolvlm": {2: 8, 1: 4},
        "mistral3": {(16, 24): 6, (8, 16): 2, (24, 16): 6},
        "gemma3": {(16, 16): 16},
    }
    for family, table in expected.items():
        model = _model(family)
        layouts = [dict(images=1, image_sizes=[size]) for size in table]
        inp = tm.build_inputs(model, family, batch_layouts=layouts)
        assert [items[0][2] for items in inp.visual_items] == list(table.values()), family
    ov = tm.build_inputs(_model("llava_onevision"), "llava_onevision", batch_layouts=[dict(images=3, videos=1)])
    assert [c for _, _, c in ov.visual_items[0]] == [10, 10, 10, 9]
    assert ov["batch_num_images"].tolist() == [3]
    qv = tm.build_inputs(_model("qwen2_vl"), "qwen2_vl", batch_layouts=[dict(videos=1, video_sizes=[(4, 16, 24)])])
    assert qv.visual_items[0][0][2] == 12 and qv["video_grid_thw"].tolist() == [[2, 4, 6]]
    assert (qv["mm_token_type_ids"] == 2).sum() == 12
    # Qwen3-VL: one timestamp + VISION_START ... VISION_END group per temporal step of a video.
    q3 = tm.build_inputs(_model("qwen3_vl"), "qwen3_vl", batch_layouts=[dict(videos=1, video_sizes=[(4, 16, 24)])])
    assert q3.visual_items[0][0][2] == 12 and (q3["input_ids"] == tm.VISION_START_ID).sum() == 2
    # GLM-4.1V: video features sit on IMAGE_TOKEN_ID placeholders, marked as video by mm_token_type_ids.
    glm = tm.build_inputs(_model("glm4v"), "glm4v", batch_layouts=[dict(videos=1, video_sizes=[(4, 16, 16)])])
    assert glm.video_mask.sum() == 8 and (glm["input_ids"][glm.video_mask] == tm.IMAGE_TOKEN_ID).all()
    # Mistral 3: a row break after each row of image tokens, the last one an end token.
    m3 = tm.build_inputs(_model("mistral3"), "mistral3", batch_layouts=[dict(images=1, image_sizes=[(16, 24)])])
    ids = m3["input_ids"][0].tolist()
    start = ids.index(tm.IMAGE_TOKEN_ID)
    assert ids[start : start + 8] == [tm.IMAGE_TOKEN_ID] * 3 + [tm.ROW_BREAK_ID] + [tm.IMAGE_TOKEN_ID] * 3 + [
        tm.VISION_END_ID]


def test_layout_options():
    model = _model("llama")
    inp = tm.build_inputs(
        model,
        "llama",
        batch_layouts=[
            dict(n_text_before=2, images=1, image_sizes=[3], n_text_after=1, scatter=True),
            dict(segments=[("image", 2), ("text", 1), ("video", 2)]),
        ],
        padding_side="right",
    )
    assert inp.visual_mask[0, :7].tolist() == [False, False, True, False, True, False, True]
    assert inp.visual_mask[1, :5].tolist() == [True, True, False, True, True]
    assert inp.image_mask[1].sum() == 2 and inp.video_mask[1].sum() == 2
    # determinism: same layouts + seed -> identical; other seed -> other tokens
    again = tm.build_inputs(model, "llama", batch_layouts=inp.layouts, padding_side="right")
    assert torch.equal(again["input_ids"], inp["input_ids"])
    other = tm.build_inputs(model, "llama", batch_layouts=[dict(n_text_before=9)] * 2, seed=1)
    assert not torch.equal(other["input_ids"][0], other["input_ids"][1])
    with pytest.raises(ValueError):
        tm.build_inputs(model, "llama", batch_layouts=[dict(imgs=1)])
    with pytest.raises(ValueError):
        tm.build_inputs(_model("llava"), "llava", batch_layouts=[dict(videos=1)])


def test_qwen_rope_deltas_do_not_leak_between_calls():
    family = "qwen2_vl"
    model = _model(family)
    inp = tm.build_inputs(model, family)
    tm.reset_state(model)
    with torch.no_grad():
        ref = model(**inp.sample(2)).logits
        model.generate(**inp, max_new_tokens=2, do_sample=False)  # leaves batch rope_deltas behind
        assert model.model.rope_deltas is not None
        after = model(**inp.sample(2)).logits
    torch.testing.assert_close(after, ref, atol=1e-6, rtol=0)
    tm.reset_state(model)
    assert model.model.rope_deltas is None


def test_right_padding_generate_runs():
    model = _model("llava_next")
    inp = tm.build_inputs(model, "llava_next", padding_side="right")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            out = model.generate(**inp, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inp["input_ids"].shape[1] + 2
