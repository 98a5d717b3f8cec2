"""Data files as users really have them: 16-bit images, huge images, other encodings, over-long prompts."""

import json

import numpy as np
import pytest
from PIL import Image

from shortv.data import SampleError, check_context, load_images, read_jsonl
from shortv.tiny import build, synthetic


def write_data(folder, *records, encoding="utf-8", bom=False):
    path = folder / "data.jsonl"
    text = "".join(json.dumps(record) + "\n" for record in records)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode(encoding))
    return path


def test_16_bit_grayscale_is_scaled_to_8_bit(tmp_path):
    gradient = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    Image.fromarray(gradient).save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "depth.png").mode == "I;16"
    [sample] = read_jsonl(write_data(tmp_path, {"image": "depth.png", "prompt": "what is it?"}))
    [image] = load_images(sample)
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.shape == (64, 64, 3)
    np.testing.assert_array_equal(pixels[..., 0], np.round(gradient / 257).astype(np.uint8))  # not all white
    assert len(np.unique(pixels)) == 256  # the whole gradient survives


def test_32_bit_images_are_refused_naming_file_and_line(tmp_path):
    synthetic.blank_image().save(tmp_path / "ok.png")
    Image.fromarray(np.full((8, 8), 70000, dtype=np.int32)).save(tmp_path / "wide.tif")
    path = write_data(tmp_path, {"image": "ok.png", "prompt": "a"}, {"image": "wide.tif", "prompt": "b"})
    with pytest.raises(SampleError, match=r"data.jsonl:2: cannot read image .*wide.tif: mode 'I' \(32-bit pixels\)"):
        read_jsonl(path)


def test_every_image_is_opened_when_the_file_is_read(tmp_path, monkeypatch):
    synthetic.blank_image().save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    good = {"image": "ok.png", "prompt": "a"}
    with pytest.raises(SampleError, match=r"data.jsonl:3: cannot read image .*missing.png"):
        read_jsonl(write_data(tmp_path, good, good, {"image": "missing.png", "prompt": "b"}))
    with pytest.raises(SampleError, match=r"data.jsonl:2: cannot read image .*broken.png"):
        read_jsonl(write_data(tmp_path, good, {"image": "broken.png", "prompt": "b"}))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the blank image has 96*96 > 2 * 1000 pixels
    with pytest.raises(SampleError, match=r"data.jsonl:1: image .*ok.png is too large to open safely"):
        read_jsonl(write_data(tmp_path, good))


def test_encodings(tmp_path):
    synthetic.blank_image().save(tmp_path / "ok.png")
    record = {"image": "ok.png", "prompt": "¿qué color?"}
    [sample] = read_jsonl(write_data(tmp_path, record, bom=True))
    assert sample.prompt == "¿qué color?"
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps({"image": "ok.png", "prompt": "a"}).encode() + b"\n"
                     + json.dumps(record, ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(SampleError, match=r"data.jsonl:2: not UTF-8 text \(invalid .*\); save the file as UTF-8"):
        read_jsonl(path)


def test_inputs_longer_than_the_context_name_the_sample(tmp_path):
    synthetic.blank_image().save(tmp_path / "ok.png")
    long_prompt = " ".join(["what color is the circle"] * 100)  # 500 words + the visual tokens > 512
    samples = read_jsonl(write_data(tmp_path, {"image": "ok.png", "prompt": "what color is the circle"},
                                    {"image": "ok.png", "prompt": long_prompt}))
    processor = build.build_processor()
    check_context(processor, samples[:1], 512, new_tokens=8)
    with pytest.raises(SampleError, match=r"data.jsonl:2: the input is \d+ tokens \+ 8 new tokens, longer than the "
                                          r"model's context of 512 tokens \(max_position_embeddings\)"):
        check_context(processor, samples, 512, new_tokens=8)
