"""The embedded tiny LLaVA: a real multimodal model that runs offline in seconds.

``shortv`` ships a small :class:`~transformers.LlavaForConditionalGeneration`
(CLIP vision tower + projector + 12-layer Llama) trained from scratch on
synthetic visual questions (:mod:`shortv.tiny.synthetic`), whose answers depend
on the image.  Each image becomes 36 visual tokens against ~12-16 text tokens,
so visual tokens dominate the sequence as in LLaVA.

>>> from shortv.tiny import load_embedded, embedded_split_path
>>> model, processor = load_embedded()
>>> test_jsonl = embedded_split_path("test")   # generated once into the cache

The calib and test splits are not stored in the package: they are regenerated
bit-identically from their seeds into ``$SHORTV_CACHE`` (default
``~/.cache/shortv``) on first use.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "EMBEDDED_SPLIT_SIZES",
    "cache_dir",
    "embedded_model_path",
    "embedded_split_path",
    "load_embedded",
]

# Bump when the generator changes in a way that changes images or questions.
DATA_VERSION = 2
EMBEDDED_SPLIT_SIZES = {"calib": 256, "test": 1000}


def embedded_model_path() -> Path:
    """Folder of the shipped checkpoint (``config.json``, ``model.safetensors``, processor files)."""
    return Path(__file__).resolve().parent / "checkpoint"


def load_embedded(dtype=None, path=None, device=None):
    """Load the embedded model (eval mode) and its processor, offline.

    ``dtype`` defaults to ``torch.float32``; ``path`` overrides the checkpoint
    folder (e.g. a freshly trained one).  Returns ``(model, processor)``.
    """
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path) if path is not None else embedded_model_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train one with `python -m shortv.tiny.train --out DIR`")
    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=dtype or torch.float32, local_files_only=True
    )
    if device is not None:
        model.to(device)
    model.eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


def cache_dir() -> Path:
    """``$SHORTV_CACHE`` or ``~/.cache/shortv`` (``$XDG_CACHE_HOME/shortv`` when that is set)."""
    env = os.environ.get("SHORTV_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "shortv"


def embedded_split_path(split: str, n: int | None = None, blank: bool = False) -> Path:
    """Path of the JSONL file of a synthetic split, generating it on first use.

    ``split`` is ``"calib"`` or ``"test"`` (``n`` defaults to
    :data:`EMBEDDED_SPLIT_SIZES`) or ``"train"`` (``n`` required).  Images
    are PNGs next to the JSONL (``image`` is relative to its folder); with
    ``blank=True`` the file holds the same questions on a blank image (blind
    control).  Regeneration is deterministic, bit-identical images included.
    """
    from . import synthetic

    if split not in synthetic.SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {synthetic.SPLITS}")
    if n is None:
        if split not in EMBEDDED_SPLIT_SIZES:
            raise ValueError(f"give n for the {split!r} split")
        n = EMBEDDED_SPLIT_SIZES[split]
    folder = cache_dir() / f"tiny-data-v{DATA_VERSION}" / f"{split}-{n}"
    jsonl = folder / (f"{split}_blank.jsonl" if blank else f"{split}.jsonl")
    if not jsonl.is_file():
        synthetic.write_split(split, folder, n, blank=blank)
    return jsonl
