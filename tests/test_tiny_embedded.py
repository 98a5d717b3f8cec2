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
from shortv.tiny.build import IMAGE_TOKEN_ID, IMAGE_TOKENS, build_model, build_processor, format_prompt

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
    samples = list(synthetic.generate("test", 300))
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


def scene_at(objs, row, col):
    (o,) = [o for o in objs if (o.row, o.col) == (row, col)]
    return o


def test_questions_are_true():
    seen = set()
    for s in synthetic.generate("calib", 120):
        objs = s["scene"].objects
        seen.add(s["type"])
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
        elif s["type"] == "neighbor":
            words = q.rstrip("?").split()
            color, shape = words[-2:]
            (anchor,) = [o for o in objs if (o.color, o.shape) == (color, shape)]
            dr, dc = synthetic.NEIGHBORS[" ".join(words[3:-3])]
            assert scene_at(objs, anchor.row + dr, anchor.col + dc).shape == a
        elif s["type"] == "shape":
            where = q.rstrip("?").split(" at the ")[1]
            (cell,) = [rc for rc, name in synthetic.POSITIONS.items() if name == where]
            assert scene_at(objs, *cell).shape == a
        elif s["type"] == "position":
            words = q.rstrip("?").split()
            (first,) = [o for o in objs if (o.color, o.shape) == tuple(words[2:4])]
            (second,) = [o for o in objs if (o.color, o.shape) == tuple(words[-2:])]
            assert first.col != second.col and (first.col < second.col) == (a == "left")
    assert seen == set(synthetic.QUESTION_TYPES)


def test_description_names_every_cell():
    scene = synthetic.make_sample("test", 0)["scene"]
    parts = synthetic.describe(scene).split(" , ")
    assert [p.rsplit(" ", 2)[0] if not p.endswith(synthetic.EMPTY) else p[: -len(synthetic.EMPTY) - 1]
            for p in parts] == list(synthetic.POSITIONS.values())
    for (row, col), part in zip(synthetic.POSITIONS, parts):
        o = scene.at(row, col)
        assert part.endswith(synthetic.EMPTY if o is None else f"{o.color} {o.shape}")


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
    assert n_image_tokens == IMAGE_TOKENS >= 100
    assert enc["input_ids"].shape[1] - n_image_tokens < 30  # visual tokens dominate
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
    """The first 20 test questions: answered from the image, not from the words."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = load_embedded()
    assert not model.training and model.dtype == torch.float32
    assert model.config.text_config.num_hidden_layers >= 12
    samples = list(synthetic.generate("test", 20))
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


def test_split_depth_copies_every_layer_with_scaled_outputs():
    """Growing by splitting: layer j of the deep model is layer j // k of the shallow one with its output
    projections divided by k (so k copies make about the original update), everything else copied."""
    from shortv.tiny.train import split_depth

    shallow = build_model(seed=0, text_layers=2).eval()
    deep = split_depth(shallow, 3).eval()
    assert len(deep.model.language_model.layers) == deep.config.text_config.num_hidden_layers == 6
    old, new = shallow.model.language_model.layers, deep.model.language_model.layers
    for j, layer in enumerate(new):
        for name, value in layer.state_dict().items():
            expected = old[j // 3].state_dict()[name]
            if name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
                expected = expected / 3
            torch.testing.assert_close(value, expected, rtol=0, atol=0)
    for name, value in shallow.state_dict().items():
        if ".language_model.layers." not in name:
            torch.testing.assert_close(deep.state_dict()[name], value, rtol=0, atol=0)
    # First-order function preservation: far closer to the shallow model than undivided copies are.
    undivided = split_depth(shallow, 3).eval()
    with torch.no_grad():
        for layer in undivided.model.language_model.layers:
            layer.self_attn.o_proj.weight.mul_(3)
            layer.mlp.down_proj.weight.mul_(3)
    sample = synthetic.make_sample("test", 3)
    enc = build_processor()(images=synthetic.render(sample["scene"]), text=format_prompt(sample["prompt"]),
                            return_tensors="pt")
    with torch.no_grad():
        a, b, c = (m(**enc).logits for m in (shallow, deep, undivided))
    assert (b - a).norm() < 0.7 * (c - a).norm()
