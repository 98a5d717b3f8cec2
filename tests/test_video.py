"""Video inputs through the data path, `shortv eval`'s evaluation and the lmms-eval model, on tiny Qwen2-VL and
LLaVA-OneVision with their own processor classes (tests/tiny_processors.py; their video processors are numpy
stand-ins, as transformers' need torchvision): a JSONL ``video`` field (frame files, or a video file read with PyAV
when it is installed), video tokens in the visual mask, fast == reference, and a clear error for a family without
video."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, build_model
from tiny_processors import build_processor
from typer.testing import CliRunner

from shortv import ShortVConfig, apply_shortv, disable_shortv, get_shortv_state, remove_shortv
from shortv.cli import app
from shortv.contribution import layer_contribution
from shortv.data import CalibrationSamples, SampleError, load_video_frames, read_jsonl
from shortv.evaluation import batch_inputs, evaluate, generate_answers, token_counts
from shortv.loading import inputs_for
from shortv.registry import find_decoder_layers, visual_token_ids
from shortv.tiny import synthetic

LAYERS = [1, 2]
#: Frames per video sample: Qwen2-VL pads an odd count to its temporal patch (2); LLaVA-OneVision stacks the videos
#: of a batch, so they share one count.
FRAMES = {"qwen2_vl": [4, 2, 3], "llava_onevision": [3, 3, 3]}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """Six frame images (the synthetic scenes), in a folder of their own."""
    folder = tmp_path_factory.mktemp("frames")
    rows = synthetic.read_split(synthetic.write_split("calib", folder, n=6))
    return [Path(row["image"]) for row in rows]


def write_jsonl(folder: Path, rows: list[dict]) -> Path:
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def video_rows(family: str, frames: list[Path]) -> list[dict]:
    prompts = ["what color is the circle ?", "is there a red square ?", "what shape is at the top left ?"]
    rows = [{"id": f"v{index}", "video": [str(frame) for frame in frames[index : index + count]], "prompt": prompt,
             "answer": "red"} for index, (count, prompt) in enumerate(zip(FRAMES[family], prompts))]
    if family == "qwen2_vl":  # an image and a video in one prompt
        rows.append({"id": "both", "image": str(frames[5]), "video": [str(f) for f in frames[:2]],
                     "prompt": "what color is the circle ?", "answer": "blue"})
    return rows


@pytest.fixture(scope="module", params=sorted(FRAMES))
def family(request):
    torch.manual_seed(0)
    return request.param, build_model(request.param, init_std=0.2), build_processor(request.param)


def expected_video_tokens(name: str, frame_count: int) -> int:
    if name == "qwen2_vl":  # 96 px frames resized to 24 x 24: a 6 x 6 patch grid, 3 x 3 merged, per 2 frames
        return -(-frame_count // 2) * 9
    return frame_count * 4 + 1  # 12 px tiles: 3 x 3 patches pooled to 2 x 2 per frame, plus a newline


def test_video_tokens_are_visual_and_fast_equals_reference(family, frames, tmp_path):
    name, model, processor = family
    samples = read_jsonl(write_jsonl(tmp_path, video_rows(name, frames)), require_answer=True)
    assert [len(sample.video) for sample in samples[:3]] == FRAMES[name] and samples[0].images == []
    batch = batch_inputs(processor, samples)
    ids = batch["input_ids"]
    assert VIDEO_TOKEN_ID in visual_token_ids(model) and IMAGE_TOKEN_ID in visual_token_ids(model)
    assert (ids == VIDEO_TOKEN_ID).sum(1).tolist()[:3] == [expected_video_tokens(name, n) for n in FRAMES[name]]
    counts = token_counts(processor, batch, visual_token_ids(model))
    visual = torch.isin(ids, torch.tensor([IMAGE_TOKEN_ID, VIDEO_TOKEN_ID]))
    assert [c["visual_tokens"] for c in counts] == visual.sum(1).tolist()

    inputs = inputs_for(model, batch)
    apply_shortv(model, ShortVConfig(LAYERS, mode="reference"))
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    apply_shortv(model, LAYERS)
    # The visual mask the frozen layers get covers the video (and image) tokens, nothing else.
    seen = []
    hook = find_decoder_layers(model)[LAYERS[0]].register_forward_pre_hook(
        lambda module, args: seen.append(getattr(get_shortv_state(model).layout, "visual", None)))
    try:
        with torch.no_grad():
            frozen = model(**inputs).logits
            fast = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            with disable_shortv(model):
                plain = model(**inputs).logits
    finally:
        hook.remove()
        remove_shortv(model)
    assert seen[0] is not None and torch.equal(seen[0], visual)
    assert torch.equal(fast, reference), name
    video_only = [index for index, sample in enumerate(samples) if not sample.images]
    assert (frozen[video_only] - plain[video_only]).abs().amax(dim=(1, 2)).min() > 1e-3  # video alone is frozen


def test_evaluate_on_video_samples(family, frames, tmp_path):
    name, model, processor = family
    samples = read_jsonl(write_jsonl(tmp_path, video_rows(name, frames)), require_answer=True)
    summary = evaluate(model, processor, samples, ShortVConfig(LAYERS), batch_size=2, max_new_tokens=4,
                       out_dir=tmp_path / "eval", progress=False)
    remove_shortv(model)
    records = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert summary.num_samples == len(samples) == len(records) and 0 < summary.flops_ratio < 1
    assert all(record["visual_tokens"] > 0 for record in records)
    assert any(record["baseline"] != record["shortv"] for record in records), records  # ShortV changes answers


@pytest.fixture(scope="module")
def clip(frames, tmp_path_factory):
    """The six frames as an MPEG-4 video file (needs PyAV, which also reads it back)."""
    av = pytest.importorskip("av")
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = 96
        stream.pix_fmt = "yuv420p"
        for frame_path in frames:
            with Image.open(frame_path) as image:
                frame = av.VideoFrame.from_ndarray(np.asarray(image.convert("RGB")), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def test_calibration_counts_video_tokens_as_visual(family, frames, tmp_path):
    name, model, processor = family
    samples = read_jsonl(write_jsonl(tmp_path, video_rows(name, frames)[:2]))  # video only
    result = layer_contribution(model, CalibrationSamples(processor, samples), progress=False)
    assert result.num_layers == len(find_decoder_layers(model)) and max(result.mean["visual"]) > 1e-6


def test_video_file_is_read_into_frames(clip, tmp_path):
    import shutil

    import numpy as np

    path = Path(shutil.copy(clip, tmp_path / "clip.mp4"))
    rows = [{"video": "clip.mp4", "num_frames": 4, "prompt": "what color is the circle ?", "answer": "red"},
            {"video": "clip.mp4", "prompt": "what color is the circle ?", "answer": "red"}]
    samples = read_jsonl(write_jsonl(tmp_path, rows), require_answer=True)
    assert samples[0].video == path and samples[0].num_frames == 4 and samples[1].num_frames == 8
    video = load_video_frames(samples[0])
    assert video.shape == (4, 96, 96, 3) and video.dtype == np.uint8
    processor = build_processor("qwen2_vl")
    batch = batch_inputs(processor, samples[:1])
    assert int((batch["input_ids"] == VIDEO_TOKEN_ID).sum()) == expected_video_tokens("qwen2_vl", 4)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    [sample] = read_jsonl(write_jsonl(tmp_path, [{"video": "broken.mp4", "prompt": "a"}]))
    with pytest.raises(SampleError, match=r"data.jsonl:1: cannot read video file .*broken.mp4 \(pyav\)"):
        load_video_frames(sample)


def test_bad_video_fields_name_file_and_line(frames, tmp_path, monkeypatch):
    good = {"video": [str(frame) for frame in frames[:2]], "prompt": "a"}
    cases = [({"video": [], "prompt": "a"}, "'video' must be a video file or a non-empty list of frame image files"),
             ({"video": 3, "prompt": "a"}, "'video' must be a video file"),
             ({"video": "missing.mp4", "prompt": "a"}, "video file not found: .*missing.mp4"),
             ({"video": ["missing.png"], "prompt": "a"}, "cannot read image .*missing.png"),
             ({**good, "num_frames": 0}, "'num_frames' must be a positive integer, got 0"),
             ({"prompt": "a"}, r"missing field\(s\) image")]
    for record, message in cases:
        with pytest.raises(SampleError, match=rf"data.jsonl:2: {message}"):
            read_jsonl(write_jsonl(tmp_path, [good, record]))
    import shortv.data

    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 16)
    monkeypatch.setattr(shortv.data, "VIDEO_BACKENDS", (("pyav", "no_such_module_h22b"),))
    [sample] = read_jsonl(write_jsonl(tmp_path, [{"video": "clip.mp4", "prompt": "a"}]))
    with pytest.raises(SampleError, match="no video decoder is installed; `pip install av`"):
        load_video_frames(sample)


def test_shortv_eval_refuses_video_for_a_family_without_video(tiny_llava_dir, frames, tmp_path):
    data = write_jsonl(tmp_path, [{"video": [str(frame) for frame in frames[:2]], "prompt": "a", "answer": "b"}])
    config = ShortVConfig([1]).save(tmp_path / "c.json")
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_llava_dir), "--data", str(data), "--config",
                                      str(config), "--out", str(tmp_path / "out")])
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "data.jsonl:1: the sample has a video, but LlavaProcessor takes no video" in output, output


def test_lmms_eval_model_takes_videos(family, frames, tiny_lmms_eval, tmp_path):
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance
    from PIL import Image

    name, model, processor = family
    samples = read_jsonl(write_jsonl(tmp_path, video_rows(name, frames)[:3]), require_answer=True)
    apply_shortv(model, LAYERS)
    try:
        expected = generate_answers(model, processor, samples, max_new_tokens=4)[0]
    finally:
        remove_shortv(model)
    lm = tiny_lmms_eval("ShortVChat", name, model, processor, n=0, batch_size=2, max_new_tokens=4)
    apply_shortv(model, LAYERS)
    docs = [{"frames": [Image.open(frame).convert("RGB") for frame in sample.video], "question": sample.prompt}
            for sample in samples]
    lm.task_dict = {"t": {"test": docs}}

    def doc_to_messages(doc):  # a video given as its frames, as lmms-eval's chat protocol allows
        return [{"role": "user", "content": [{"type": "video", "url": doc["frames"]},
                                             {"type": "text", "text": doc["question"]}]}]

    requests = [Instance(request_type="generate_until", idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1},
                         arguments=(doc["question"], doc_to_messages, {"max_new_tokens": 4}, i, "t", "test"))
                for i, doc in enumerate(docs)]
    try:
        assert lm.generate_until(requests) == expected
    finally:
        remove_shortv(model)


def test_lmms_eval_refuses_video_for_a_family_without_video(tiny_llava_dir, frames):
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance
    from PIL import Image

    from shortv.integrations.lmms_eval import ShortVChat

    lm = ShortVChat.create_from_arg_string(f"pretrained={tiny_llava_dir},n=0", {"device": "cpu"})
    lm.task_dict = {"t": {"test": [{"frames": [Image.open(frame).convert("RGB") for frame in frames[:2]]}]}}
    messages = [{"role": "user", "content": [{"type": "video", "url": lm.task_dict["t"]["test"][0]["frames"]},
                                             {"type": "text", "text": "what moves ?"}]}]
    request = Instance(request_type="generate_until", idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1},
                       arguments=("what moves ?", messages, {"max_new_tokens": 2}, 0, "t", "test"))
    with pytest.raises(ValueError, match="this task gives a video, but LlavaProcessor takes no video"):
        lm.generate_until([request])


def test_lmms_eval_simple_model_reads_video_files(clip, tiny_lmms_eval, tmp_path):
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance

    torch.manual_seed(0)
    model, processor = build_model("qwen2_vl", init_std=0.2), build_processor("qwen2_vl")
    prompts = ["what color is the circle ?", "is there a red square ?"]
    rows = [{"video": str(clip), "num_frames": 4, "prompt": prompt, "answer": "red"} for prompt in prompts]
    samples = read_jsonl(write_jsonl(tmp_path, rows), require_answer=True)
    apply_shortv(model, LAYERS)
    expected = generate_answers(model, processor, samples, max_new_tokens=4)[0]
    lm = tiny_lmms_eval("ShortV", "qwen2_vl", model, processor, batch_size=2, num_frames=4)
    lm.task_dict = {"t": {"test": [{"video": str(clip), "question": prompt} for prompt in prompts]}}
    requests = [Instance(request_type="generate_until", idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1},
                         arguments=(prompt, {"max_new_tokens": 4}, lambda doc: [doc["video"]], i, "t", "test"))
                for i, prompt in enumerate(prompts)]
    assert lm.generate_until(requests) == expected  # lmms-eval's usual video visual: a file path
