"""The public API of the tiny-model factories (documented in the package docstring) and the input builder."""

from __future__ import annotations

from typing import Any

import torch

from . import grid_like, llava_like, patch_sequences, text_only
from .base import (
    BOS_ID,
    EOS_ID,
    IMAGE,
    IMAGE_TOKEN_ID,
    PAD_ID,
    ROW_BREAK_ID,
    TEXT_ID_RANGE,
    VIDEO,
    VIDEO_END_ID,
    VIDEO_START_ID,
    VIDEO_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    VOCAB_SIZE,
    FamilySpec,
)

__all__ = [
    "FAMILIES", "MULTIMODAL_FAMILIES", "TEXT_ONLY_FAMILIES", "VIDEO_FAMILIES", "MODEL_TYPES", "SPECS", "VOCAB_SIZE",
    "PAD_ID", "BOS_ID", "EOS_ID", "IMAGE_TOKEN_ID", "VIDEO_TOKEN_ID", "VISION_START_ID", "VISION_END_ID",
    "ROW_BREAK_ID", "VIDEO_START_ID", "VIDEO_END_ID", "TinyInputs", "build_model", "build_inputs",
    "single_sample_inputs", "default_layouts", "reset_state",
]

SPECS: dict[str, FamilySpec] = {
    spec.name: spec for spec in (*llava_like.SPECS, *grid_like.SPECS, *patch_sequences.SPECS, *text_only.SPECS)
}
FAMILIES: list[str] = list(SPECS)
TEXT_ONLY_FAMILIES: list[str] = [name for name, spec in SPECS.items() if spec.text_only]
MULTIMODAL_FAMILIES: list[str] = [name for name in FAMILIES if name not in TEXT_ONLY_FAMILIES]
VIDEO_FAMILIES: list[str] = [name for name, spec in SPECS.items() if spec.video_sizes and not spec.text_only]
MODEL_TYPES: dict[str, str] = {name: spec.model_type for name, spec in SPECS.items()}


def _spec(family: str) -> FamilySpec:
    if family not in SPECS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return SPECS[family]


# --------------------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------------------
def _all_configs(config):
    yield config
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            yield from _all_configs(sub)


def build_model(
    family: str,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    init_std: float | None = None,
    text_overrides: dict | None = None,
):
    """A tiny fp32 random-weight model of ``family`` in eval mode (deterministic in ``seed``)."""
    import transformers

    spec = _spec(family)
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
    config = spec.make_config(dict(text_overrides or {}))
    if init_std is not None:
        for cfg in _all_configs(config):
            if hasattr(cfg, "initializer_range"):
                cfg.initializer_range = init_std
    cls = getattr(transformers, spec.model_class)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    assert model.config.model_type == spec.model_type, (model.config.model_type, family)
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = PAD_ID, BOS_ID, EOS_ID
    gen.do_sample = False
    spec.finalize(model)
    model.eval()
    return model


def reset_state(model) -> None:
    """Clear state some models cache between calls (the Qwen-VL / GLM-4.1V ``rope_deltas``)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None


# --------------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------------
def default_layouts(family: str, batch_size: int = 3) -> list[dict]:
    """Mixed per-sample layouts: 1 image, 2 interleaved images, text only / video; lengths all differ."""
    spec = _spec(family)
    pool = [
        dict(n_text_before=3, images=1, n_text_after=5),
        dict(n_text_before=2, images=2, n_text_between=3, n_text_after=4),
        dict(n_text_before=6, images=1, n_text_after=2),
        dict(n_text_before=4, images=0, n_text_after=7),
    ]
    if spec.video_sizes and spec.mixes_images_and_videos:
        pool[2] = dict(n_text_before=5, videos=1, n_text_after=3)
    if spec.text_only:
        pool[1]["scatter"] = True
    return [dict(pool[i % len(pool)]) for i in range(batch_size)]


_LAYOUT_KEYS = {
    "n_text_before", "images", "videos", "n_text_between", "n_text_after", "image_sizes", "video_sizes", "scatter",
    "seed", "segments",
}


def _tuple_or_int(v):
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v)
    return int(v)


def _resolve_layout(spec: FamilySpec, layout: dict, default_seed: int) -> dict:
    unknown = set(layout) - _LAYOUT_KEYS
    if unknown:
        raise ValueError(f"unknown layout keys {sorted(unknown)}; allowed: {sorted(_LAYOUT_KEYS)}")
    out = dict(layout)
    s = int(out.get("seed", default_seed))
    out["seed"] = s
    if out.get("segments") is None:
        n_img, n_vid = int(out.get("images", 0)), int(out.get("videos", 0))
        img_sizes = list(out.get("image_sizes") or [])
        vid_sizes = list(out.get("video_sizes") or [])
        if n_vid and not spec.video_sizes:
            raise ValueError(f"family {spec.name!r} has no video input")
        while len(img_sizes) < n_img:
            img_sizes.append(spec.image_sizes[(s + len(img_sizes)) % len(spec.image_sizes)])
        while len(vid_sizes) < n_vid:
            vid_sizes.append(spec.video_sizes[(s + len(vid_sizes)) % len(spec.video_sizes)])
        visual = [("image", _tuple_or_int(z)) for z in img_sizes[:n_img]]
        visual += [("video", _tuple_or_int(z)) for z in vid_sizes[:n_vid]]
        segments: list = []
        if out.get("n_text_before", 3):
            segments.append(("text", int(out.get("n_text_before", 3))))
        for j, item in enumerate(visual):
            if j and out.get("n_text_between", 2):
                segments.append(("text", int(out.get("n_text_between", 2))))
            segments.append(item)
        if out.get("n_text_after", 4):
            segments.append(("text", int(out.get("n_text_after", 4))))
        out["segments"] = segments
    else:
        out["segments"] = [(k, _tuple_or_int(v)) for k, v in out["segments"]]
    for kind, _ in out["segments"]:
        if kind not in ("text", "image", "video"):
            raise ValueError(f"bad segment kind {kind!r}")
        if kind == "video" and not spec.video_sizes:
            raise ValueError(f"family {spec.name!r} has no video input")
    if not out["segments"]:
        raise ValueError("empty sample")
    return out


class TinyInputs(dict):
    """``dict`` of model inputs plus ground-truth attributes (see the package docstring)."""

    model: Any
    family: str
    layouts: list[dict]
    padding_side: str
    visual_mask: torch.Tensor
    image_mask: torch.Tensor
    video_mask: torch.Tensor
    lengths: list[int]
    visual_items: list[list[tuple]]

    def positions(self, i: int) -> torch.Tensor:
        return torch.nonzero(self["attention_mask"][i].bool()).squeeze(-1)

    def sample(self, i: int) -> "TinyInputs":
        return build_inputs(self.model, self.family, batch_layouts=[self.layouts[i]], padding_side=self.padding_side)

    def to(self, device) -> "TinyInputs":
        out = TinyInputs({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in dict.items(self)})
        out.__dict__.update(self.__dict__)
        for name in ("visual_mask", "image_mask", "video_mask"):
            setattr(out, name, getattr(self, name).to(device))
        return out

    def __repr__(self):
        keys = {k: (tuple(v.shape) if torch.is_tensor(v) else v) for k, v in dict.items(self)}
        return f"TinyInputs(family={self.family!r}, padding_side={self.padding_side!r}, {keys})"


def single_sample_inputs(inputs: TinyInputs, i: int) -> TinyInputs:
    """Sample ``i`` of ``inputs`` rebuilt alone (batch 1, unpadded)."""
    return inputs.sample(i)


def _sample_tokens(spec: FamilySpec, model, layout: dict) -> tuple[list[int], list[int], list[tuple], list]:
    """(ids, modality codes, visual items as (kind, size, n_tokens), (kind, item) pairs) of one sample."""
    gen = torch.Generator().manual_seed(layout["seed"])
    visual = [(k, z) for k, z in layout["segments"] if k != "text"]
    items = [spec.make_item(model, k, z, gen) for k, z in visual]
    with torch.no_grad():
        counts = spec.count_tokens(model, [k for k, _ in visual], items)
    ids: list[int] = []
    codes: list[int] = []
    j = 0
    for kind, value in layout["segments"]:
        if kind == "text":
            ids += torch.randint(*TEXT_ID_RANGE, (value,), generator=gen).tolist()
            codes += [0] * value
            continue
        item = dict(items[j], gen=gen, scatter=layout.get("scatter", False))
        block_ids, block_codes = spec.placeholder(kind, counts[j], item)
        ids += block_ids
        codes += block_codes
        j += 1
    return ids, codes, [(k, z, c) for (k, z), c in zip(visual, counts)], list(zip([k for k, _ in visual], items))


def build_inputs(
    model,
    family: str,
    *,
    batch_layouts: list[dict] | None = None,
    padding_side: str = "left",
    seed: int = 0,
) -> TinyInputs:
    """Padded batch of inputs for ``model`` (see the package docstring for the layout spec)."""
    spec = _spec(family)
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if model.config.model_type != spec.model_type:
        raise ValueError(f"model is {model.config.model_type!r}, family {family!r} expects {spec.model_type!r}")
    if batch_layouts is None:
        batch_layouts = default_layouts(family)
    layouts = [_resolve_layout(spec, lay, seed * 10007 + i) for i, lay in enumerate(batch_layouts)]
    samples = [_sample_tokens(spec, model, lay) for lay in layouts]
    kinds = {kind for *_, pairs in samples for kind, _ in pairs}
    if not spec.mixes_images_and_videos and kinds == {"image", "video"}:
        raise ValueError(f"{family} cannot take images and videos in one batch")

    B, L = len(samples), max(len(ids) for ids, *_ in samples)
    input_ids = torch.full((B, L), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    mm_types = torch.zeros(B, L, dtype=torch.long)
    for b, (ids, codes, *_) in enumerate(samples):
        sl = slice(L - len(ids), L) if padding_side == "left" else slice(0, len(ids))
        input_ids[b, sl] = torch.tensor(ids)
        attention_mask[b, sl] = 1
        mm_types[b, sl] = torch.tensor(codes)

    out = TinyInputs(input_ids=input_ids, attention_mask=attention_mask)
    if not spec.text_only:
        out.update(spec.collate([pairs for *_, pairs in samples]))
    out.update(spec.extra_inputs(mm_types, attention_mask))

    out.model = model
    out.family = family
    out.layouts = layouts
    out.padding_side = padding_side
    out.image_mask = mm_types == IMAGE
    out.video_mask = mm_types == VIDEO
    out.visual_mask = out.image_mask | out.video_mask
    out.lengths = [len(ids) for ids, *_ in samples]
    out.visual_items = [items for _, _, items, _ in samples]
    if not spec.text_only:  # the feature count must equal the number of placeholders the model will fill
        for kind, mask in (("image", out.image_mask), ("video", out.video_mask)):
            assert sum(c for its in out.visual_items for k, _, c in its if k == kind) == int(mask.sum()), kind
    dev = next(model.parameters()).device
    return out.to(dev) if dev.type != "cpu" else out
