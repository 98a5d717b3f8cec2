"""Visual-QA samples from JSONL, turned into model inputs with the model's own processor and chat template.

One JSON object per line::

    {"image": "imgs/0001.png", "prompt": "What colour is the circle?", "answer": "red", "type": "color"}

``image`` is a path or a list of paths, relative to the JSONL file's folder; ``answer`` is optional for
calibration and required for evaluation; ``id``, ``type`` and ``choices`` (multiple choice) are optional.
For the families that take video (Qwen2/2.5/3-VL, LLaVA-OneVision, ...), a sample may have a ``video`` instead of
(or besides) ``image``: a list of frame image files (all used, in order), or one video file, decoded with
transformers' ``load_video`` into ``num_frames`` (default 8) uniformly spaced frames::

    {"video": ["clip/000.png", "clip/001.png", "clip/002.png"], "prompt": "What moves?", "answer": "ball"}
    {"video": "clips/0002.mp4", "num_frames": 16, "prompt": "What moves?", "answer": "car"}
Everything that can be checked without the model is checked up front (every line parses, every image opens), and
`check_context` checks every input's length against the model's context before any compute. Every error names the
file and line. Sample order is the file's; subsampling is seeded, so runs are reproducible and an image always stays
with its own question.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .contribution import CalibrationSample

POSITIONS = ("last_prompt", "answer")
#: Frames sampled from a video file when a sample does not say (``num_frames``).
DEFAULT_VIDEO_FRAMES = 8
#: transformers' video decoders, in the order tried (the first one installed reads video files).
VIDEO_BACKENDS = (("torchcodec", "torchcodec"), ("pyav", "av"), ("decord", "decord"), ("opencv", "cv2"))


class SampleError(ValueError):
    """A bad sample; the message starts with ``file:line``."""


@dataclass
class VQASample:
    id: str
    images: list[Path]
    prompt: str
    answer: str | None = None
    type: str | None = None
    choices: list[str] | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: A video: its frame image files, or one video file (read with ``num_frames`` frames); None: no video.
    video: list[Path] | Path | None = None
    num_frames: int = DEFAULT_VIDEO_FRAMES

    def error(self, message: str) -> SampleError:
        return SampleError(f"{self.source}: {message}")


def _read_text(path: Path) -> str:
    """UTF-8 text (a leading byte-order mark is dropped); a decoding error names the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise SampleError(f"{path}:{line}: not UTF-8 text ({error.reason}); save the file as UTF-8") from None


def file_sha256(path: str | Path) -> str:
    """Content hash of a data file: a resumed run checks it is continuing on the same data."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_jsonl(path: str | Path, require_answer: bool = False, check_images: bool = True) -> list[VQASample]:
    """Parse and check every line up front (and open every image), so a bad line fails before any compute."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    samples, seen = [], set()
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SampleError(f"{where}: not valid JSON ({error.msg})") from error
        if not isinstance(record, dict):
            raise SampleError(f"{where}: expected a JSON object, got {type(record).__name__}")
        visual = () if "video" in record else ("image",)
        missing = [key for key in visual + ("prompt",) + (("answer",) if require_answer else ()) if key not in record]
        if missing:
            raise SampleError(f"{where}: missing field(s) {', '.join(missing)}")
        images = record.get("image", [])
        images = images if isinstance(images, list) else [images]
        if ("image" in record and not images) or not all(isinstance(image, str) and image for image in images):
            raise SampleError(f"{where}: 'image' must be a path or a non-empty list of paths")
        video, num_frames = _video_field(record, path.parent, where)
        if not isinstance(record["prompt"], str) or not record["prompt"].strip():
            raise SampleError(f"{where}: 'prompt' must be a non-empty string")
        sample_id = str(record.get("id", f"{path.name}:{number}"))
        if sample_id in seen:
            raise SampleError(f"{where}: duplicate id {sample_id!r}")
        seen.add(sample_id)
        choices = record.get("choices")
        if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
            raise SampleError(f"{where}: 'choices' must be a list of strings")
        known = {"id", "image", "prompt", "answer", "type", "choices", "video", "num_frames"}
        samples.append(
            VQASample(
                id=sample_id,
                images=[(path.parent / image) for image in images],
                prompt=record["prompt"],
                answer=None if record.get("answer") is None else str(record["answer"]),
                type=None if record.get("type") is None else str(record["type"]),
                choices=choices,
                source=where,
                extra={key: value for key, value in record.items() if key not in known},
                video=video,
                num_frames=num_frames,
            )
        )
    if not samples:
        raise SampleError(f"{path}: no samples (empty file)")
    if check_images:
        for sample in samples:
            for image_path in [*sample.images, *(sample.video if isinstance(sample.video, list) else [])]:
                _open_image(sample, image_path, decode=False)
            if isinstance(sample.video, Path) and not sample.video.is_file():
                raise sample.error(f"video file not found: {sample.video}")
    return samples


def _video_field(record: dict[str, Any], folder: Path, where: str) -> tuple[list[Path] | Path | None, int]:
    """(video, num_frames) of one JSONL record: frame files or one video file, relative to ``folder``."""
    num_frames = record.get("num_frames", DEFAULT_VIDEO_FRAMES)
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise SampleError(f"{where}: 'num_frames' must be a positive integer, got {num_frames!r}")
    if "video" not in record:
        return None, num_frames
    video = record["video"]
    if isinstance(video, str) and video:
        return folder / video, num_frames
    if isinstance(video, list) and video and all(isinstance(frame, str) and frame for frame in video):
        return [folder / frame for frame in video], num_frames
    raise SampleError(f"{where}: 'video' must be a video file or a non-empty list of frame image files")


def subsample(samples: Sequence[VQASample], num_samples: int | None, seed: int = 0) -> list[VQASample]:
    """``num_samples`` samples chosen with ``seed``, kept in file order (all of them when None)."""
    if num_samples is None or num_samples >= len(samples):
        return list(samples)
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    chosen = sorted(random.Random(seed).sample(range(len(samples)), num_samples))
    return [samples[index] for index in chosen]


#: 16-bit grayscale modes; their 0..65535 values are scaled to 8 bits (``convert("RGB")`` would clip them to white).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
#: 32-bit integer and float pixels: no fixed range to scale from, so they are refused.
_UNSCALED_MODES = ("I", "F")


def _check_mode(image: Any) -> None:
    if image.mode in _UNSCALED_MODES:
        raise ValueError(f"mode {image.mode!r} (32-bit pixels) has no fixed range; "
                         "save the image as 8-bit (or 16-bit) RGB or grayscale")


def to_rgb(image: Any) -> Any:
    """An RGB PIL image. 16-bit grayscale is scaled to 8 bits; 32-bit pixels are refused (ValueError)."""
    from PIL import Image

    _check_mode(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image).astype(np.float32) / 257.0  # 65535 -> 255
        return Image.fromarray(np.round(pixels).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def _open_image(sample: VQASample, image_path: Path, decode: bool = True) -> Any:
    """The image as RGB; with ``decode=False`` only checked (it opens, its size is safe, its mode is usable)."""
    from PIL import Image

    try:
        with Image.open(image_path) as image:
            if decode:
                return to_rgb(image)
            _check_mode(image)
            image.verify()
            return None
    except Image.DecompressionBombError as error:
        raise sample.error(f"image {image_path} is too large to open safely ({error})") from None
    except (OSError, ValueError, SyntaxError) as error:  # verify() reports a broken file as SyntaxError
        raise sample.error(f"cannot read image {image_path}: {error}") from None


def load_images(sample: VQASample) -> list[Any]:
    return [_open_image(sample, image_path) for image_path in sample.images]


def read_video(path: str | Path, num_frames: int = DEFAULT_VIDEO_FRAMES) -> Any:
    """``num_frames`` uniformly spaced RGB frames of a video file, as a ``(frames, height, width, 3)`` uint8 array,
    decoded by transformers' ``load_video`` with the first installed backend of `VIDEO_BACKENDS`."""
    import importlib.util

    from transformers.video_utils import load_video

    backend = next((name for name, module in VIDEO_BACKENDS if importlib.util.find_spec(module)), None)
    if backend is None:
        raise ValueError(f"cannot read video file {path}: no video decoder is installed; `pip install av` (or "
                         "torchcodec, decord, opencv-python), or give the frames as image files")
    try:
        frames, _ = load_video(str(path), num_frames=num_frames, backend=backend)
    except Exception as error:  # noqa: BLE001 - each decoder raises its own errors for a bad file
        reason = str(error).strip() or type(error).__name__
        raise ValueError(f"cannot read video file {path} ({backend}): {reason}") from None
    return frames


def load_video_frames(sample: VQASample) -> Any:
    """The sample's video as frames (RGB PIL images from frame files, or an array read from a video file)."""
    if isinstance(sample.video, list):
        return [_open_image(sample, frame) for frame in sample.video]
    try:
        return read_video(sample.video, sample.num_frames)
    except ValueError as error:
        raise sample.error(str(error)) from None


def takes_video(processor: Any) -> bool:
    """Whether ``processor`` turns videos into model inputs (a video processor and a video placeholder)."""
    return getattr(processor, "video_processor", None) is not None and bool(getattr(processor, "video_token", None))


def check_takes_video(processor: Any, what: str = "a sample has a video") -> None:
    if not takes_video(processor):
        raise ValueError(
            f"{what}, but {type(processor).__name__} takes no video (no video processor; transformers' video "
            "processors need torchvision); video works with the families that take it (Qwen2/2.5/3-VL, "
            "LLaVA-OneVision, ...)"
        )


def encode(processor: Any, texts: list[str], images: list[list[Any]], videos: list[Any], **kwargs: Any) -> Any:
    """The processor's outputs for prompts with their images (one list per prompt) and videos (in prompt order).

    Images go in as one list per prompt: processors that check each prompt's image count (Gemma 3, SmolVLM) need
    that nesting, and all others accept it."""
    if videos:
        check_takes_video(processor)
        kwargs["videos"] = videos
    return processor(images=images if any(images) else None, text=texts, return_tensors="pt", **kwargs)


def prompt_text(processor: Any, sample: VQASample) -> str:
    """The templated prompt, ending where the model's answer starts."""
    content = [{"type": "image"} for _ in sample.images] + ([{"type": "video"}] if sample.video is not None else [])
    if sample.choices:
        letters = "".join(f"\n{chr(65 + index)}. {choice}" for index, choice in enumerate(sample.choices))
        content.append({"type": "text", "text": sample.prompt + letters})
    else:
        content.append({"type": "text", "text": sample.prompt})
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def visual_token_count(processor: Any, input_ids: Any, token_ids: Sequence[int] = ()) -> int:
    """Visual placeholder tokens in ``input_ids``: those of ``token_ids`` (the model's image and video ids, from
    `shortv.registry.visual_token_ids`) when given, else the processor's image and video tokens."""
    if token_ids:
        import torch

        return int(torch.isin(input_ids, torch.tensor(list(token_ids), device=input_ids.device)).sum())
    count = 0
    for kind in ("image", "video"):
        token_id = getattr(processor, f"{kind}_token_id", None)
        token = getattr(processor, f"{kind}_token", None)
        if token_id is None and token:
            token_id = processor.tokenizer.convert_tokens_to_ids(token)
        if token_id is not None:
            count += int((input_ids == token_id).sum())
    return count


def _process(processor: Any, sample: VQASample, images: list[Any], text: str) -> Any:
    videos = [load_video_frames(sample)] if sample.video is not None else []
    if videos:
        check_takes_video(processor, f"{sample.source}: the sample has a video")
    try:
        return encode(processor, [text], [images], videos)
    except ValueError as error:
        raise sample.error(f"the processor rejected the sample: {error}") from error


def model_inputs(processor: Any, sample: VQASample, with_answer: bool = False) -> tuple[dict[str, Any], int]:
    """Batch-of-one inputs, and the number of prompt tokens (answer tokens follow when ``with_answer``)."""
    images = load_images(sample)
    text = prompt_text(processor, sample)
    prompt = _process(processor, sample, images, text)
    if visual_token_count(processor, prompt["input_ids"]) == 0:
        visual = "image or video" if sample.video is not None else "image"
        raise sample.error(f"no {visual} token in the input after applying the chat template")
    prompt_length = prompt["input_ids"].shape[1]
    if not with_answer:
        return dict(prompt), prompt_length
    if not sample.answer:
        raise sample.error("answer positions need an 'answer'")
    full = _process(processor, sample, images, f"{text} {sample.answer}")
    if full["input_ids"].shape[1] <= prompt_length or not bool(
        (full["input_ids"][0, :prompt_length] == prompt["input_ids"][0]).all()
    ):
        raise sample.error("the prompt's tokens are not a prefix of prompt + answer; cannot score the answer tokens")
    return dict(full), prompt_length


def check_context(
    processor: Any, samples: Sequence[VQASample], context_length: int | None, new_tokens: int = 0,
    with_answer: bool = False,
) -> None:
    """Build every sample's input once and check it fits the model's context (``new_tokens`` more for generation),
    so that an over-long input is named before any compute instead of running for minutes."""
    if context_length is None:
        return
    for sample in samples:
        inputs, _ = model_inputs(processor, sample, with_answer=with_answer)
        length = int(inputs["input_ids"].shape[1])
        if length + new_tokens > context_length:
            generated = f" + {new_tokens} new tokens" if new_tokens else ""
            raise sample.error(
                f"the input is {length} tokens{generated}, longer than the model's context of {context_length} tokens "
                "(max_position_embeddings); shorten the prompt or use fewer/smaller images"
            )


class CalibrationSamples(Sequence):
    """Calibration samples built on access, so resumed runs skip finished ones without loading their images."""

    def __init__(self, processor: Any, samples: Sequence[VQASample], position: str = "last_prompt"):
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
        self.processor, self.samples, self.position = processor, list(samples), position
        self.ids = [sample.id for sample in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> CalibrationSample:  # type: ignore[override]
        sample = self.samples[index]
        if self.position == "last_prompt":
            inputs, prompt_length = model_inputs(self.processor, sample)
            return CalibrationSample(id=sample.id, inputs=inputs)
        inputs, prompt_length = model_inputs(self.processor, sample, with_answer=True)
        # Teacher forcing: the distribution at position p predicts token p+1, i.e. each answer token.
        targets = tuple(range(prompt_length - 1, inputs["input_ids"].shape[1] - 1))
        return CalibrationSample(id=sample.id, inputs=inputs, target_positions=targets)
