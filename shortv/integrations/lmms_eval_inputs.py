"""What the lmms-eval model makes of a request, importable without lmms-eval: a task's ``generation_kwargs``
(`GenerationSettings`, stop strings) and its visuals (`Visuals`: images and video frames from PIL images, files or
nested lists)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import DEFAULT_VIDEO_FRAMES, read_video, to_rgb

DEFAULT_MAX_NEW_TOKENS = 1024


@dataclass(frozen=True)
class GenerationSettings:
    """One task's ``generation_kwargs``, normalised; requests are batched only with requests of equal settings."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    num_beams: int = 1
    repetition_penalty: float | None = None
    until: tuple[str, ...] = ()

    @classmethod
    def from_kwargs(
        cls, gen_kwargs: dict[str, Any] | None, default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    ) -> tuple[GenerationSettings, list[str]]:
        """(settings, names of the keys that were ignored). ``temperature`` 0 (or absent) means greedy."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None)
        if until is None:
            until = ()
        elif isinstance(until, str):
            until = (until,)
        elif isinstance(until, (list, tuple)) and all(isinstance(stop, str) for stop in until):
            until = tuple(until)
        else:
            raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}")
        max_new_tokens = kwargs.pop("max_new_tokens", None)
        max_new_tokens = default_max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        temperature = float(kwargs.pop("temperature", None) or 0.0)
        do_sample_flag = kwargs.pop("do_sample", None)
        do_sample = temperature > 0 and do_sample_flag is not False
        top_p = kwargs.pop("top_p", None)
        top_k = kwargs.pop("top_k", None)
        num_beams = int(kwargs.pop("num_beams", None) or 1)
        repetition_penalty = kwargs.pop("repetition_penalty", None)
        settings = cls(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=None if not do_sample or top_p is None else float(top_p),
            top_k=None if not do_sample or top_k is None else int(top_k),
            num_beams=num_beams,
            repetition_penalty=None if repetition_penalty is None else float(repetition_penalty),
            until=tuple(stop for stop in dict.fromkeys(until) if stop),  # an empty stop string would cut everything
        )
        return settings, sorted(kwargs)

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                                  "num_beams": self.num_beams}
        if self.do_sample:
            kwargs["temperature"] = self.temperature
            if self.top_p is not None:
                kwargs["top_p"] = self.top_p
            if self.top_k is not None:
                kwargs["top_k"] = self.top_k
        if self.repetition_penalty is not None:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs


def truncate_at_stops(text: str, stops: tuple[str, ...] | list[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = min((index for index in (text.find(stop) for stop in stops) if index >= 0), default=len(text))
    return text[:cut]


def _stop_strings_criterion(tokenizer: Any, stops: tuple[str, ...], prompt_length: int) -> Any:
    """Per-row criterion: a row is done once its decoded answer contains a stop string (it is cut there anyway)."""
    from transformers import StoppingCriteria

    class StopStrings(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
            texts = tokenizer.batch_decode(input_ids[:, prompt_length:], skip_special_tokens=True)
            done = [any(stop in text for stop in stops) for text in texts]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StopStrings()


_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_AUDIO_EXTENSIONS = (".wav", ".mp3", ".m4a", ".aac", ".flac", ".ogg", ".opus")


@dataclass
class Visuals:
    """A prompt's images (RGB PIL) and videos (frames), in the order the task gives them."""

    images: list[Any]
    videos: list[Any]

    def __add__(self, other: Visuals) -> Visuals:
        return Visuals(self.images + other.images, self.videos + other.videos)


def _as_visuals(visuals: Any, num_frames: int = DEFAULT_VIDEO_FRAMES, kind: str | None = None) -> Visuals:
    """lmms-eval visuals (possibly nested lists) as images and videos: PIL images; image files; video files (read
    into ``num_frames`` frames) or ``{"type": "video", "url": ...}``; ``kind="video"``: the item is one video (a
    file, or a list of frames). Audio is refused clearly."""
    from PIL import Image

    found = Visuals([], [])
    if kind == "video" and isinstance(visuals, (list, tuple)) and visuals:  # one video given as its frames
        found.videos.append([_rgb(frame) for frame in visuals])
        return found
    pending = [visuals] if visuals is not None else []
    while pending:
        item = pending.pop(0)
        if isinstance(item, (list, tuple)):
            pending[:0] = list(item)
        elif isinstance(item, Image.Image):
            found.images.append(_rgb(item))
        elif isinstance(item, dict) and item.get("type") in ("image", "video") and ("url" in item or "path" in item):
            found += _as_visuals(item.get("url", item.get("path")), num_frames, item["type"])
        elif isinstance(item, (str, Path)) and (kind == "video" or not str(item).lower().endswith(
                _IMAGE_EXTENSIONS + _AUDIO_EXTENSIONS)):
            try:
                found.videos.append(read_video(item, num_frames))
            except ValueError as error:
                raise ValueError(f"a task video cannot be used: {error}") from None
        elif isinstance(item, (str, Path)) and str(item).lower().endswith(_IMAGE_EXTENSIONS):
            try:
                with Image.open(item) as image:
                    found.images.append(_rgb(image))
            except OSError as error:
                raise ValueError(f"a task image cannot be opened: {error}") from None
        elif item is not None:
            kind_name = "audio" if isinstance(item, (str, Path, dict)) else type(item).__name__
            raise NotImplementedError(
                f"the shortv lmms-eval model takes images and videos; this task gives {kind_name}"
            )
    return found


def _rgb(image: Any) -> Any:
    """An RGB PIL image (16-bit grayscale scaled to 8 bits, not clipped to white); numpy frames pass through."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        return image
    try:
        return to_rgb(image)
    except ValueError as error:
        raise ValueError(f"a task image cannot be used: {error}") from None
