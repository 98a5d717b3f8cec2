"""JSONL data, selection and the calibrate pipeline on the (untrained) tiny LLaVA architecture with its processor."""

import json
import os

import pytest
import torch

from shortv.calibrate import calibrate
from shortv.contribution import LCResult
from shortv.data import CalibrationSamples, SampleError, read_jsonl, subsample
from shortv.flops import LayerDims, flops_ratio
from shortv.selection import select_layers
from shortv.tiny import build, synthetic


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llava")
    torch.manual_seed(0)
    model = build.build_model(seed=0).eval()
    processor = build.build_processor()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    return synthetic.write_split("calib", tmp_path_factory.mktemp("calib"), n=6)


def test_read_jsonl_resolves_relative_paths_and_keeps_pairs(calib_file):
    samples = read_jsonl(calib_file)
    raw = [json.loads(line) for line in calib_file.read_text().splitlines()]
    assert [s.prompt for s in samples] == [r["prompt"] for r in raw]
    assert all(s.images[0] == calib_file.parent / r["image"] and s.images[0].is_file() for s, r in zip(samples, raw))
    chosen = subsample(samples, 3, seed=1)
    assert chosen == subsample(samples, 3, seed=1) and len(chosen) == 3
    by_id = {s.id: s for s in samples}
    assert all(by_id[s.id].images == s.images and by_id[s.id].prompt == s.prompt for s in chosen)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "what?"}', r"bad.jsonl:2: missing field\(s\) image"),
        ('{"image": "a.png"}', r"bad.jsonl:2: missing field\(s\) prompt"),
        ("[1, 2]", "bad.jsonl:2: expected a JSON object"),
        ("{oops", "bad.jsonl:2: not valid JSON"),
        ('{"image": [], "prompt": "x"}', "bad.jsonl:2: 'image' must be a path"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image": "a.png", "prompt": "fine"}\n' + line + "\n")
    with pytest.raises(SampleError, match=message):
        read_jsonl(path)


def test_empty_file_and_unreadable_image_and_no_image_token(tmp_path, tiny_llava):
    _, _, processor = tiny_llava
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SampleError, match="no samples"):
        read_jsonl(empty)
    (tmp_path / "broken.png").write_text("not a png")
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"image": "broken.png", "prompt": "what colour is the circle"}) + "\n")
    with pytest.raises(SampleError, match=r"data.jsonl:1: cannot read image .*broken.png"):
        CalibrationSamples(processor, read_jsonl(path))[0]
    synthetic.blank_image().save(tmp_path / "ok.png")
    path.write_text(json.dumps({"image": "ok.png", "prompt": "what colour is the circle"}) + "\n")

    class TemplateWithoutImage:  # a chat template that drops the image placeholder
        image_token_id = processor.image_token_id

        def apply_chat_template(self, messages, **kwargs):
            return "USER: what colour is the circle ASSISTANT:"

        def __call__(self, images, **kwargs):
            return processor(**kwargs)  # a processor that does not check placeholders itself

    with pytest.raises(SampleError, match="data.jsonl:1: no image token in the input after applying the chat template"):
        CalibrationSamples(TemplateWithoutImage(), read_jsonl(path))[0]
    processor_check = type("Strict", (TemplateWithoutImage,), {"__call__": lambda self, **kw: processor(**kw)})
    with pytest.raises(SampleError, match="data.jsonl:1: the processor rejected the sample: .*number of <image> tokens"):
        CalibrationSamples(processor_check(), read_jsonl(path))[0]


def test_answer_positions_are_the_answer_tokens(tiny_llava, calib_file):
    _, _, processor = tiny_llava
    samples = read_jsonl(calib_file)
    built = CalibrationSamples(processor, samples, position="answer")[0]
    prompt_only = CalibrationSamples(processor, samples)[0]
    prompt_length = prompt_only.inputs["input_ids"].shape[1]
    assert built.target_positions[0] == prompt_length - 1
    answer_ids = built.inputs["input_ids"][0, prompt_length:]
    assert processor.tokenizer.decode(answer_ids).strip() == samples[0].answer.lower()


def test_select_layers_by_n_and_flops_budget(tmp_path):
    lc = LCResult(num_layers=4, token_types=("visual",), sample_ids=["a", "b"],
                  per_sample={"visual": [[0.3, 0.1, 0.2, 0.0], [0.5, 0.3, 0.0, 0.0]]})
    assert lc.order == [3, 2, 1, 0]
    config = select_layers(lc, n=2)
    assert config.layers == [3, 2] and config.provenance["n"] == 2
    dims = LayerDims(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                     head_dim=16, num_layers=4, vocab_size=100)
    budget = select_layers(lc.save(tmp_path / "lc.json"), flops_ratio=0.8, dims=dims, text_tokens=8, visual_tokens=64)
    achieved = flops_ratio(dims, 8, 64, budget.layers, formula="exact")
    assert achieved <= 0.8 < flops_ratio(dims, 8, 64, budget.layers[:-1], formula="exact")
    assert budget.provenance["lc"] == str(tmp_path / "lc.json")
    with pytest.raises(ValueError, match="exactly one of n= or flops_ratio="):
        select_layers(lc)
    with pytest.raises(ValueError, match=r"n must be in 0..4"):
        select_layers(lc, n=5)
    with pytest.raises(ValueError, match="below what freezing every layer reaches"):
        select_layers(lc, flops_ratio=0.01, dims=dims, text_tokens=8, visual_tokens=64)


def test_calibrate_writes_lc_config_plot_and_resumes(tiny_llava, calib_file, tmp_path, monkeypatch):
    folder, _, _ = tiny_llava
    out = tmp_path / "out"
    result = calibrate(str(folder), data=calib_file, out_dir=out, num_samples=3, n=5, progress=False)
    assert (out / "lc.json").is_file() and (out / "lc.png").stat().st_size > 1000
    config = json.loads((out / "shortv_config.json").read_text())
    assert config["layers"] == result.lc.order[:5] and config["provenance"]["lc"] == str(out / "lc.json")
    assert len(result.lc.sample_ids) == 3 and result.lc.num_layers == 12
    rows = result.table()
    assert [row[3] for row in sorted(rows, key=lambda row: row[3])] == list(range(1, 13))
    assert rows[-1][1] == 0.0  # last layer, visual
    # The same model and data given by relative paths are the same run.
    monkeypatch.chdir(tmp_path)
    relative_data, relative_model = os.path.relpath(calib_file), os.path.relpath(folder)
    assert not os.path.isabs(relative_data) and not os.path.isabs(relative_model)
    again = calibrate(relative_model, data=relative_data, out_dir="out", num_samples=3, n=5, progress=False,
                      resume=True)
    assert again.lc.per_sample == result.lc.per_sample
    assert again.lc.metadata["layer_evaluations_this_run"] == 0
    with pytest.raises(ValueError, match=r"other settings \(num_samples_requested: 3 before, 2 now\)"):
        calibrate(relative_model, data=relative_data, out_dir="out", num_samples=2, n=5, progress=False, resume=True)


def fail_if_loaded(*args, **kwargs):
    pytest.fail("the model was loaded before the inputs were checked")


def test_everything_is_checked_before_the_model_loads(tiny_llava, calib_file, tmp_path, monkeypatch):
    import shortv.calibrate as calibration

    folder, _, _ = tiny_llava
    monkeypatch.setattr(calibration, "load_model", fail_if_loaded)
    with pytest.raises(ValueError, match=r"n must be in 0..12 \(the model's decoder layers\), got 13"):
        calibrate(str(folder), data=calib_file, out_dir=tmp_path / "a", n=13, progress=False)
    bad_data = calib_file.parent / "bad.jsonl"  # beside the images the other lines name
    bad_data.write_text(calib_file.read_text() + json.dumps({"image": "nowhere.png", "prompt": "q"}) + "\n")
    with pytest.raises(SampleError, match=r"bad.jsonl:7: cannot read image .*nowhere.png"):
        calibrate(str(folder), data=bad_data, out_dir=tmp_path / "b", progress=False)
    for name in ("lc.json", "shortv_config.json", "lc_samples.jsonl"):  # any earlier result, records or not
        out = tmp_path / name.replace(".", "_")
        out.mkdir()
        (out / name).write_text("{}")
        with pytest.raises(FileExistsError, match=rf"already holds results \({name}\); .*rerun with --resume"):
            calibrate(str(folder), data=calib_file, out_dir=out, progress=False)
        assert (out / name).read_text() == "{}"


def test_over_long_input_is_refused_before_any_compute(tiny_llava, calib_file, tmp_path, monkeypatch):
    import shortv.calibrate as calibration

    _, model, processor = tiny_llava
    monkeypatch.setattr(calibration, "layer_contribution", fail_if_loaded)
    record = json.loads(calib_file.read_text().splitlines()[0])
    record.update(id="long", prompt=" ".join(["what color is the circle"] * 100))
    data = calib_file.parent / "long.jsonl"
    data.write_text(calib_file.read_text() + json.dumps(record) + "\n")
    with pytest.raises(SampleError, match=r"long.jsonl:7: the input is \d+ tokens, longer than the model's context "
                                          r"of 512 tokens"):
        calibrate(model, processor=processor, data=data, out_dir=tmp_path / "out", progress=False)
