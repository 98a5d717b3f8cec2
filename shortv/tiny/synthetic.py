"""Synthetic visual question answering data for the embedded tiny LLaVA.

Every image is a 3x3 grid of cells on a dark background; some cells hold a
coloured shape (circle, square or triangle).  The layout is aligned with the
vision tower's patches (96x96 pixels, 32-pixel cells = 2x2 patches of 16 pixels)
so that a very small model can learn it, but every question still has to be
answered by looking at the image:

========== ================================================ =====================
type       prompt                                           answers
========== ================================================ =====================
color      What color is the circle?                        red, green, blue, ...
shape      What shape is at the top left?                   circle, square, triangle
count      How many red shapes are there?                   one, two, three
position   Is the red circle left or right of the blue ...? left, right
exists     Is there a red triangle?                         yes, no
color_at   What color is the shape at the center?           red, green, blue, ...
row_count  How many shapes are in the top row?              one, two, three
========== ================================================ =====================

Four of the seven types ask where things are (``shape``, ``position``,
``color_at``, ``row_count``); the other three ask only what is there.

Answers are balanced per type and the words of a question carry no information
about its answer, so a model that does not look at the image cannot beat
majority-class guessing.

Everything is deterministic: a sample is a pure function of ``(split, seed,
index)``; shapes are rasterised with integer arithmetic (not with Pillow's
drawing code) so the pixels do not depend on the Pillow version.  Splits are
disjoint by construction: the content of every scene (which shape of which
colour in which cell) is hashed into one of 16 buckets and each split only
accepts scenes from its own buckets, so no test image ever occurs in training.
"""

from __future__ import annotations

import json
import random
import zlib
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "ANSWERS",
    "BACKGROUND",
    "CELL",
    "COLORS",
    "GRID",
    "IMAGE_SIZE",
    "POSITIONS",
    "QUESTION_TYPES",
    "SHAPES",
    "SPLITS",
    "Obj",
    "Scene",
    "blank_image",
    "describe",
    "generate",
    "majority_baseline",
    "make_sample",
    "read_split",
    "render",
    "training_conversation",
    "vocabulary",
    "write_split",
]

# --------------------------------------------------------------------------- constants

IMAGE_SIZE = 96
GRID = 3
CELL = IMAGE_SIZE // GRID  # 32 px = 4x4 patches of 8 px
SHAPE_SIZE = 24  # bounding box of a shape, centred in its cell
SHAPE_OFFSET = (CELL - SHAPE_SIZE) // 2

BACKGROUND = (24, 24, 24)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 50, 50),
    "green": (50, 190, 70),
    "blue": (60, 100, 240),
    "yellow": (240, 220, 50),
    "purple": (160, 70, 210),
}
SHAPES = ("circle", "square", "triangle")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "middle", "right")
# Name of every cell, indexed by (row, col).
POSITIONS: dict[tuple[int, int], str] = {
    (r, c): ("center" if (r, c) == (1, 1) else f"{ROWS[r]} {COLS[c]}")
    for r in range(GRID)
    for c in range(GRID)
}
COUNT_WORDS = ("one", "two", "three")

QUESTION_TYPES = ("color", "shape", "count", "position", "exists", "color_at", "row_count")
ANSWERS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count": COUNT_WORDS,
    "position": ("left", "right"),
    "exists": ("yes", "no"),
    "color_at": tuple(COLORS),
    "row_count": COUNT_WORDS,
}

SPLITS = ("train", "calib", "test")
_N_BUCKETS = 16
_SPLIT_BUCKETS = {"test": frozenset({0}), "calib": frozenset({1}), "train": frozenset(range(2, _N_BUCKETS))}
_DEFAULT_SEED = {"train": 0, "calib": 1, "test": 2}

# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Objects on the 3x3 grid; at most one object per cell and per (colour, shape)."""

    objects: tuple[Obj, ...]

    def key(self) -> str:
        return ";".join(f"{o.row}{o.col}{o.color[:2]}{o.shape[:2]}" for o in sorted(self.objects, key=lambda o: (o.row, o.col)))

    def bucket(self) -> int:
        return zlib.crc32(self.key().encode()) % _N_BUCKETS

    def at(self, row: int, col: int) -> Obj | None:
        for o in self.objects:
            if (o.row, o.col) == (row, col):
                return o
        return None

    def to_json(self) -> list[dict]:
        return [{"shape": o.shape, "color": o.color, "row": o.row, "col": o.col} for o in self.objects]


N_OBJECTS = (3, 6)  # objects per scene (test and calib)


def _random_scene(rng: random.Random, n_objects: tuple[int, int] = N_OBJECTS) -> Scene:
    n = rng.randint(*n_objects)
    # A small palette per scene makes repeated colours (count two/three) common.
    k = rng.randint(max(1, (n + 2) // 3), len(COLORS))
    palette = rng.sample(list(COLORS), k)
    combos = [(s, c) for c in palette for s in SHAPES]
    chosen = rng.sample(combos, n)
    cells = rng.sample(range(GRID * GRID), n)
    return Scene(tuple(Obj(s, c, cell // GRID, cell % GRID) for (s, c), cell in zip(chosen, cells)))


# --------------------------------------------------------------------------- questions
# Each asker returns (prompt, answer) with the requested answer, or None when the
# scene cannot be asked such a question.  Everything in the prompt that is chosen
# here is chosen independently of the answer, so the text leaks nothing.


def _ask_color(scene: Scene, rng: random.Random, target: str):
    shape_counts = Counter(o.shape for o in scene.objects)
    cands = [o for o in scene.objects if o.color == target and shape_counts[o.shape] == 1]
    if not cands:
        return None
    o = rng.choice(cands)
    return f"What color is the {o.shape}?", target


def _object_at(scene: Scene, rng: random.Random, target: str, attribute: str, template: str):
    """A question about the object at a named position whose ``attribute`` is ``target``."""
    cands = [o for o in scene.objects if getattr(o, attribute) == target]
    if not cands:
        return None
    o = rng.choice(cands)
    return template.format(POSITIONS[(o.row, o.col)]), target


def _how_many(scene: Scene, rng: random.Random, target: str, key, name, template: str):
    """A question about a group (objects with the same ``key``) of exactly ``target`` objects."""
    n = COUNT_WORDS.index(target) + 1
    counts = Counter(key(o) for o in scene.objects)
    cands = sorted(k for k, c in counts.items() if c == n)
    if not cands:
        return None
    return template.format(name(rng.choice(cands))), target


_ask_shape = partial(_object_at, attribute="shape", template="What shape is at the {}?")
_ask_color_at = partial(_object_at, attribute="color", template="What color is the shape at the {}?")
_ask_count = partial(_how_many, key=lambda o: o.color, name=str, template="How many {} shapes are there?")
_ask_row_count = partial(
    _how_many, key=lambda o: o.row, name=ROWS.__getitem__, template="How many shapes are in the {} row?"
)


def _ask_position(scene: Scene, rng: random.Random, target: str):
    pairs = [
        (a, b)
        for a in scene.objects
        for b in scene.objects
        if a.col != b.col and (a.col < b.col) == (target == "left")
    ]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    return f"Is the {a.name} left or right of the {b.name}?", target


def _ask_exists(scene: Scene, rng: random.Random, target: str):
    present = {(o.color, o.shape) for o in scene.objects}
    if target == "yes":
        cands = sorted(present)
    else:
        cands = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    if not cands:
        return None
    c, s = rng.choice(cands)
    return f"Is there a {c} {s}?", target


_ASKERS = {
    "color": _ask_color,
    "shape": _ask_shape,
    "count": _ask_count,
    "position": _ask_position,
    "exists": _ask_exists,
    "color_at": _ask_color_at,
    "row_count": _ask_row_count,
}

# --------------------------------------------------------------------------- rendering


def _masks() -> dict[str, np.ndarray]:
    u = np.arange(SHAPE_SIZE)[None, :]  # x inside the box
    v = np.arange(SHAPE_SIZE)[:, None]  # y inside the box
    d = 2 * u + 1 - SHAPE_SIZE  # doubled distance of the pixel centre from the box centre (x)
    e = 2 * v + 1 - SHAPE_SIZE
    return {
        "circle": d * d + e * e <= SHAPE_SIZE * SHAPE_SIZE,
        "square": np.ones((SHAPE_SIZE, SHAPE_SIZE), dtype=bool),
        "triangle": 2 * np.abs(d) <= 2 * v + 1,  # apex at the top, base at the bottom
    }


_MASKS = _masks()


def render(scene: Scene) -> Image.Image:
    """Rasterise a scene into a 96x96 RGB image (integer arithmetic only)."""
    arr = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    arr[:] = BACKGROUND
    for o in scene.objects:
        y0 = o.row * CELL + SHAPE_OFFSET
        x0 = o.col * CELL + SHAPE_OFFSET
        box = arr[y0 : y0 + SHAPE_SIZE, x0 : x0 + SHAPE_SIZE]
        box[_MASKS[o.shape]] = COLORS[o.color]
    return Image.fromarray(arr, mode="RGB")


def blank_image() -> Image.Image:
    """The control image: background only, no shapes."""
    return render(Scene(()))


# --------------------------------------------------------------------------- samples


def _split_rng(split: str, seed: int, index: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`: stable across Python versions.
    return random.Random(f"shortv-tiny/{split}/{seed}/{index}")


def _check_split(split: str) -> None:
    if split not in _SPLIT_BUCKETS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _scene_for(rng: random.Random, split: str, requests: Sequence[tuple[str, str]], max_tries: int = 100_000):
    """Rejection-sample a scene of ``split`` that can answer every (type, answer) request."""
    buckets = _SPLIT_BUCKETS[split]
    for _ in range(max_tries):
        scene = _random_scene(rng)
        if scene.bucket() not in buckets:
            continue
        qas = []
        for qtype, target in requests:
            qa = _ASKERS[qtype](scene, rng, target)
            if qa is None:
                break
            qas.append((qa[0], qa[1], qtype))
        else:
            if len({q for q, _, _ in qas}) == len(qas):
                return scene, qas
    raise RuntimeError(f"could not build a scene for {requests}")  # pragma: no cover


def make_sample(split: str, index: int, seed: int | None = None) -> dict:
    """Sample ``index`` of a split (deterministic).

    Types cycle through :data:`QUESTION_TYPES` and, within a type, answers cycle
    through :data:`ANSWERS`, so every split is balanced exactly.  Returns a dict
    with ``id``, ``prompt``, ``answer``, ``type`` and ``scene`` (a :class:`Scene`).
    """
    _check_split(split)
    seed = _DEFAULT_SEED[split] if seed is None else int(seed)
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    answers = ANSWERS[qtype]
    # Offset by the seed so that different seeds do not share the answer order.
    target = answers[(index // len(QUESTION_TYPES) + seed) % len(answers)]
    rng = _split_rng(split, seed, index)
    scene, [(prompt, answer, _)] = _scene_for(rng, split, [(qtype, target)])
    return {"id": f"{split}-{seed}-{index:05d}", "prompt": prompt, "answer": answer, "type": qtype, "scene": scene}


def generate(split: str, n: int, seed: int | None = None) -> Iterator[dict]:
    """Yield ``n`` samples of a split (see :func:`make_sample`)."""
    for i in range(n):
        yield make_sample(split, i, seed)


DESCRIBE_PROMPT = "Describe the image."


def describe(scene: Scene) -> str:
    """Every object in reading order, e.g. ``"top left red circle , center blue square"``."""
    objs = sorted(scene.objects, key=lambda o: (o.row, o.col))
    return " , ".join(f"{POSITIONS[(o.row, o.col)]} {o.color} {o.shape}" for o in objs)


def training_conversation(
    rng: random.Random,
    n_questions: int = 10,
    with_description: bool = True,
    split: str = "train",
    n_objects: tuple[int, int] | None = None,
):
    """One training image with many questions about it (a multi-turn conversation).

    By default the first question's type and answer are drawn uniformly (so the
    first turn is distributed exactly like a test question); the scene is then
    asked up to ``n_questions - 1`` more questions (every type twice, shuffled,
    each with a random answer the scene allows), and finally, with
    ``with_description``, to describe itself (dense supervision of what is
    where).  ``n_objects=(lo, hi)`` draws a scene with lo..hi objects instead
    (curriculum) and then asks only questions that scene allows.
    Returns ``(scene, [(prompt, answer, type), ...])``.
    """
    _check_split(split)
    if n_objects is None:
        first = rng.choice(QUESTION_TYPES)
        scene, qas = _scene_for(rng, split, [(first, rng.choice(ANSWERS[first]))])
    else:
        while True:
            scene = _random_scene(rng, n_objects)
            if scene.bucket() in _SPLIT_BUCKETS[split]:
                break
        first, qas = None, []
    types = [t for t in QUESTION_TYPES for _ in range(2)]
    if first is not None:
        types.remove(first)
    rng.shuffle(types)
    seen = {q for q, _, _ in qas}
    for qtype in types[: max(0, n_questions - len(qas))]:
        answers = list(ANSWERS[qtype])
        rng.shuffle(answers)
        for target in answers:
            qa = _ASKERS[qtype](scene, rng, target)
            if qa is not None and qa[0] not in seen:
                seen.add(qa[0])
                qas.append((qa[0], qa[1], qtype))
                break
    if with_description:
        qas.append((DESCRIBE_PROMPT, describe(scene), "describe"))
    return scene, qas


# --------------------------------------------------------------------------- files


def write_split(split: str, out_dir, n: int, seed: int | None = None, blank: bool = False) -> Path:
    """Write ``n`` samples of ``split`` as PNGs plus ``<split>.jsonl`` into ``out_dir``.

    Each JSONL line is ``{"id", "image", "prompt", "answer", "type"}`` with
    ``image`` relative to ``out_dir``.  With ``blank=True`` the questions are the
    same but every sample points at one blank image (the blind control) and the
    file is called ``<split>_blank.jsonl``.  Returns the path of the JSONL file.
    """
    _check_split(split)
    out = Path(out_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out / (f"{split}_blank.jsonl" if blank else f"{split}.jsonl")
    if blank:
        blank_image().save(img_dir / "blank.png", format="PNG")
    tmp = jsonl.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for s in generate(split, n, seed):
            if blank:
                rel = "images/blank.png"
            else:
                rel = f"images/{s['id']}.png"
                render(s["scene"]).save(out / rel, format="PNG")
            rec = {"id": s["id"], "image": rel, "prompt": s["prompt"], "answer": s["answer"], "type": s["type"]}
            f.write(json.dumps(rec) + "\n")
    tmp.replace(jsonl)
    return jsonl


def read_split(jsonl) -> list[dict]:
    """Read a JSONL file written by :func:`write_split`; ``image`` becomes an absolute path."""
    path = Path(jsonl)
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                rec["image"] = str(path.parent / rec["image"])
                rows.append(rec)
    return rows


# --------------------------------------------------------------------------- helpers


def vocabulary() -> list[str]:
    """Every lower-cased word or punctuation token that prompts and answers can contain."""
    words: set[str] = set()
    texts = [
        "What color is the ?",
        "What shape is at the ?",
        "How many shapes are there?",
        "Is the left or right of the ?",
        "Is there a ?",
        "What color is the shape at the ?",
        "How many shapes are in the row?",
        DESCRIBE_PROMPT,
        " , ",
    ]
    texts += list(COLORS) + list(SHAPES) + list(POSITIONS.values())
    for answers in ANSWERS.values():
        texts += list(answers)
    for t in texts:
        for w in t.replace("?", " ? ").replace(".", " . ").split():
            words.add(w.lower())
    return sorted(words)


def majority_baseline(samples: Sequence[dict]) -> dict[str, float]:
    """Accuracy of always answering the most frequent answer of each question type."""
    by_type: dict[str, Counter] = {}
    for s in samples:
        by_type.setdefault(s["type"], Counter())[s["answer"]] += 1
    out = {t: c.most_common(1)[0][1] / sum(c.values()) for t, c in by_type.items()}
    total = sum(sum(c.values()) for c in by_type.values())
    out["overall"] = sum(c.most_common(1)[0][1] for c in by_type.values()) / max(total, 1)
    return out
