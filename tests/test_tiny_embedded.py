"""The embedded tiny LLaVA: synthetic data, processor, shipped checkpoint."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from shortv.tiny import EMBEDDED_SPLIT_SIZES, embedded_model_path, embedded_split_path, load_embedded, synthetic
from shortv.tiny.build import IMAGE_TOKEN_ID, IMAGE_TOKENS, PATCH_SIZE, build_model, build_processor, format_prompt

CHECKPOINT = embedded_model_path()
needs_checkpoint = pytest.mark.skipif(
    not (CHECKPOINT / "config.json").is_file(), reason="embedded checkpoint not trained/shipped yet"
)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- generator


def test_generator_is_deterministic(tmp_path):
    a = synthetic.write_split("test", tmp_path / "a", 12)
    b = synthetic.write_split("test", tmp_path / "b", 12)
    assert a.read_text() == b.read_text()
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    c = synthetic.write_split("test", tmp_path / "c", 12, seed=7)
    assert c.read_text() != a.read_text()


def test_jsonl_format(tmp_path):
    jsonl = synthetic.write_split("calib", tmp_path, 10)
    assert jsonl == tmp_path / "calib.jsonl"
    lines = jsonl.read_text().splitlines()
    assert len(lines) == 10
    for line, sample in zip(lines, synthetic.generate("calib", 10)):
        rec = json.loads(line)
        assert set(rec) == {"id", "image", "prompt", "answer", "type"}
        assert not Path(rec["image"]).is_absolute()
        with Image.open(tmp_path / rec["image"]) as im:
            assert im.size == (synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE)
            assert im.convert("RGB").tobytes() == synthetic.render(sample["scene"]).tobytes()
        assert (rec["prompt"], rec["answer"], rec["type"]) == (sample["prompt"], sample["answer"], sample["type"])


def test_blank_control(tmp_path):
    jsonl = synthetic.write_split("test", tmp_path, 10, blank=True)
    normal = synthetic.write_split("test", tmp_path, 10)
    blank_rows, rows = synthetic.read_split(jsonl), synthetic.read_split(normal)
    assert [(r["prompt"], r["answer"]) for r in blank_rows] == [(r["prompt"], r["answer"]) for r in rows]
    with Image.open(blank_rows[0]["image"]) as im:
        assert im.convert("RGB").tobytes() == bytes(synthetic.BACKGROUND) * synthetic.IMAGE_SIZE**2


def test_splits_are_disjoint():
    keys = {}
    for split, n in [("train", 400), ("calib", 256), ("test", 400)]:
        samples = list(synthetic.generate(split, n))
        assert len({s["id"] for s in samples}) == n
        keys[split] = {s["scene"].key() for s in samples}
    assert not keys["train"] & keys["calib"]
    assert not keys["train"] & keys["test"]
    assert not keys["calib"] & keys["test"]
    # Training conversations come from the training buckets as well.
    import random

    for i in range(100):
        scene, _ = synthetic.training_conversation(random.Random(i))
        assert scene.key() not in keys["test"] | keys["calib"]


def test_answers_vocabulary_and_balance():
    samples = list(synthetic.generate("test", 350))
    processor = build_processor()
    tok = processor.tokenizer
    for s in samples:
        assert s["answer"] in synthetic.ANSWERS[s["type"]]
        assert tok.unk_token_id not in tok(format_prompt(s["prompt"]) + " " + s["answer"])["input_ids"]
        assert len(tok(s["answer"], add_special_tokens=False)["input_ids"]) == 1
    per_type = Counter(s["type"] for s in samples)
    assert set(per_type) == set(synthetic.QUESTION_TYPES) and len(set(per_type.values())) == 1
    majority = synthetic.majority_baseline(samples)
    for t, answers in synthetic.ANSWERS.items():
        assert majority[t] == pytest.approx(1 / len(answers), abs=0.02)


def test_questions_are_true():
    for s in synthetic.generate("calib", 100):
        objs = s["scene"].objects
        q, a = s["prompt"].lower(), s["answer"]
        if s["type"] == "count":
            color = q.split()[2]
            assert synthetic.COUNT_WORDS[sum(o.color == color for o in objs) - 1] == a
        elif s["type"] == "exists":
            words = q.rstrip("?").split()
            assert (a == "yes") == any((o.color, o.shape) == (words[3], words[4]) for o in objs)
        elif s["type"] == "color":
            shape = q.rstrip("?").split()[-1]
            (o,) = [o for o in objs if o.shape == shape]
            assert o.color == a
        elif s["type"] in ("shape", "color_at"):
            place = q.rstrip("?").split(" at the ")[1]
            (o,) = [o for o in objs if synthetic.POSITIONS[(o.row, o.col)] == place]
            assert (o.shape if s["type"] == "shape" else o.color) == a
        elif s["type"] == "row_count":
            row = synthetic.ROWS.index(q.split()[-2])
            assert synthetic.COUNT_WORDS[sum(o.row == row for o in objs) - 1] == a
        elif s["type"] == "position":
            words = q.rstrip("?").split()
            (first,) = [o for o in objs if (o.color, o.shape) == (words[2], words[3])]
            (second,) = [o for o in objs if (o.color, o.shape) == (words[-2], words[-1])]
            assert a == ("left" if first.col < second.col else "right") and first.col != second.col


# --------------------------------------------------------------------------- processor


def test_processor_round_trip():
    processor = build_processor()
    model = build_model(seed=0)
    sample = synthetic.make_sample("test", 1)
    image = synthetic.render(sample["scene"])
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["prompt"]}]}],
        add_generation_prompt=True,
    )
    assert text == format_prompt(sample["prompt"])
    enc = processor(images=image, text=text, return_tensors="pt")
    n_image_tokens = int((enc["input_ids"] == IMAGE_TOKEN_ID).sum())
    assert n_image_tokens == IMAGE_TOKENS == (synthetic.IMAGE_SIZE // PATCH_SIZE) ** 2
    assert enc["input_ids"].shape[1] - n_image_tokens < n_image_tokens / 2  # visual tokens dominate
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=enc["pixel_values"])
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    n_features = sum(f.reshape(-1, f.shape[-1]).shape[0] for f in feats)
    assert n_features == n_image_tokens
    with torch.no_grad():
        out = model(**enc)
    assert out.logits.shape[:2] == enc["input_ids"].shape


def test_embedded_split_path(tmp_path, monkeypatch):
    monkeypatch.setenv("SHORTV_CACHE", str(tmp_path))
    path = embedded_split_path("calib", n=8)
    assert path.is_file() and tmp_path in path.parents
    rows = synthetic.read_split(path)
    assert len(rows) == 8
    for row, sample in zip(rows, synthetic.generate("calib", 8)):
        with Image.open(row["image"]) as im:
            assert im.tobytes() == synthetic.render(sample["scene"]).tobytes()
    assert embedded_split_path("calib", n=8) == path  # cached
    assert EMBEDDED_SPLIT_SIZES["test"] >= 500


# --------------------------------------------------------------------------- shipped checkpoint


@needs_checkpoint
def test_checkpoint_files_and_size():
    files = {p.name for p in CHECKPOINT.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= files
    assert any(n.startswith("chat_template") for n in files) or "chat_template" in (CHECKPOINT / "tokenizer_config.json").read_text()
    total = sum(p.stat().st_size for p in CHECKPOINT.iterdir() if p.is_file())
    assert total <= 25 * 2**20


@needs_checkpoint
def test_checkpoint_answers_fixed_questions(monkeypatch):
    """The first 21 test questions (three per type): answered from the image, not from the words."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = load_embedded()
    assert not model.training and model.dtype == torch.float32
    assert model.config.text_config.num_hidden_layers >= 12
    samples = list(synthetic.generate("test", 21))
    prompts = [format_prompt(s["prompt"]) for s in samples]

    def answers(images):
        enc = processor(images=images, text=prompts, padding=True, return_tensors="pt")
        assert int((enc["input_ids"][0] == IMAGE_TOKEN_ID).sum()) == IMAGE_TOKENS
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=3, do_sample=False)
        return [a.strip() for a in processor.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)]

    seen = answers([synthetic.render(s["scene"]) for s in samples])
    blind = answers([synthetic.blank_image()] * len(samples))
    truth = [s["answer"] for s in samples]
    assert all(a in synthetic.ANSWERS[s["type"]] for a, s in zip(seen, samples)), seen
    correct = sum(a == t for a, t in zip(seen, truth))
    correct_blind = sum(a == t for a, t in zip(blind, truth))
    assert correct >= 17, list(zip(seen, truth))
    assert correct - correct_blind >= 6, (correct, correct_blind)
    # Each type the model has learned: one of its first three questions answered correctly and only with the
    # image (the blind answer differs). Not "position" (left/right of another object): the shipped model answers
    # it at chance (50.3% on 1000 test questions, docs/embedded_model.md), always "left" here.
    types = synthetic.QUESTION_TYPES
    for k, kind in enumerate(types):  # the test split cycles through the types
        if kind == "position":
            continue
        firsts = [k + r * len(types) for r in range(3)]
        assert any(seen[i] == truth[i] != blind[i] for i in firsts), [(seen[i], truth[i], blind[i]) for i in firsts]


def test_grow_depth_keeps_the_function():
    """Progressive stacking: the deepened model computes exactly what the shallow one did, and can still learn."""
    from shortv.tiny.train import grow_depth

    shallow = build_model(seed=0, text_layers=4).eval()
    with torch.no_grad():  # trained-looking weights, so that the copy matters
        for p in shallow.model.language_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    deep = grow_depth(shallow, 12, seed=0).eval()
    assert len(deep.model.language_model.layers) == deep.config.text_config.num_hidden_layers == 12
    sample = synthetic.make_sample("test", 3)
    enc = build_processor()(images=synthetic.render(sample["scene"]), text=format_prompt(sample["prompt"]),
                            return_tensors="pt")
    with torch.no_grad():
        a, b = shallow(**enc).logits, deep(**enc).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    new_layer = deep.model.language_model.layers[1]
    assert new_layer.self_attn.o_proj.weight.abs().max() == 0 and new_layer.self_attn.q_proj.weight.abs().max() > 0


def test_vision_tower_has_no_position_table():
    """Where a patch lies reaches the language model only through the order of the visual tokens."""
    model = build_model(seed=0)
    table = model.model.vision_tower.embeddings.position_embedding.weight
    assert table.abs().max() == 0
    image = synthetic.render(synthetic.make_sample("test", 0)["scene"])
    pixels = build_processor().image_processor(images=image, return_tensors="pt")["pixel_values"]
    grid, cell = synthetic.IMAGE_SIZE // PATCH_SIZE, synthetic.CELL // PATCH_SIZE
    moved = torch.roll(pixels, shifts=(synthetic.CELL, synthetic.CELL), dims=(2, 3))  # one cell down and right, cyclic
    with torch.no_grad():
        f = model.model.vision_tower(pixels).last_hidden_state[0, 1:].reshape(grid, grid, -1)
        g = model.model.vision_tower(moved).last_hidden_state[0, 1:].reshape(grid, grid, -1)
    torch.testing.assert_close(torch.roll(f, shifts=(cell, cell), dims=(0, 1)), g, rtol=1e-4, atol=1e-4)


def test_vision_targets_are_local():
    """Stage 1 teaches each patch only which object is in its own cell: nothing about where, or about the rest."""
    from shortv.tiny.train import OBJECTS, patch_targets

    scene = synthetic.make_sample("test", 0)["scene"]
    grid, cell = synthetic.IMAGE_SIZE // PATCH_SIZE, synthetic.CELL // PATCH_SIZE
    targets = patch_targets(scene, grid).reshape(grid, grid)
    for row in range(synthetic.GRID):
        for col in range(synthetic.GRID):
            o = scene.at(row, col)
            block = targets[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell]
            assert (block == (0 if o is None else 1 + OBJECTS.index((o.color, o.shape)))).all()
    alone = synthetic.Scene(scene.objects[:1])
    first = scene.objects[0]
    block = (slice(first.row * cell, (first.row + 1) * cell), slice(first.col * cell, (first.col + 1) * cell))
    assert torch.equal(patch_targets(alone, grid).reshape(grid, grid)[block], targets[block])
