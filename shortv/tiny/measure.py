"""Accuracy of the embedded tiny LLaVA on its synthetic test split.

``python -m shortv.tiny.measure`` prints the test accuracy (overall and per
question type, greedy decoding), the blind control (same questions, blank
image) and the majority-class baseline per type.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Sequence

import torch
from PIL import Image

from . import synthetic
from .build import format_prompt

__all__ = ["evaluate", "normalize_answer", "report", "main"]


def normalize_answer(text: str) -> str:
    words = text.strip().lower().replace(".", " ").replace("</s>", " ").split()
    return words[0] if words else ""


def _image_of(sample: dict) -> Image.Image:
    if "scene" in sample:
        return synthetic.render(sample["scene"])
    with Image.open(sample["image"]) as im:
        return im.convert("RGB")


@torch.inference_mode()
def evaluate(
    model,
    processor,
    samples: Sequence[dict],
    blank: bool = False,
    batch_size: int = 50,
    max_new_tokens: int = 3,
) -> dict:
    """Greedy-decode every sample and score the first word against ``answer``.

    ``samples`` are dicts with ``prompt``, ``answer``, ``type`` and either a
    ``scene`` (rendered on the fly) or an ``image`` path.  With ``blank=True``
    every image is replaced by :func:`synthetic.blank_image` (blind control).
    Returns ``{"overall": acc, "<type>": acc, ..., "n": n, "predictions": [...]}``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tok = processor.tokenizer
    blank_img = synthetic.blank_image() if blank else None
    preds: list[str] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        images = [blank_img if blank else _image_of(s) for s in chunk]
        texts = [format_prompt(s["prompt"]) for s in chunk]
        enc = processor(images=images, text=texts, padding=True, return_tensors="pt").to(device)
        enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        preds += tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    if was_training:
        model.train()
    correct: dict[str, list[int]] = defaultdict(list)
    for s, p in zip(samples, preds):
        ok = int(normalize_answer(p) == s["answer"])
        correct[s["type"]].append(ok)
        correct["overall"].append(ok)
    res = {t: sum(v) / len(v) for t, v in correct.items()}
    res["n"] = len(samples)
    res["predictions"] = [normalize_answer(p) for p in preds]
    return res


def report(test: dict, blind: dict, majority: dict) -> str:
    """A plain-text table of accuracies (percent)."""
    types = [t for t in synthetic.QUESTION_TYPES if t in test] + ["overall"]
    lines = [f"{'type':<10}{'accuracy':>10}{'blind':>10}{'majority':>10}"]
    for t in types:
        lines.append(f"{t:<10}{100 * test[t]:>10.1f}{100 * blind[t]:>10.1f}{100 * majority[t]:>10.1f}")
    lines.append(f"(n = {test['n']} test questions, greedy decoding)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m shortv.tiny.measure", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the embedded one)")
    ap.add_argument("--n", type=int, default=None, help="only the first N test questions")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON as well")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from . import embedded_split_path, load_embedded

    model, processor = load_embedded(path=args.model)
    samples = synthetic.read_split(embedded_split_path("test"))
    if args.n:
        samples = samples[: args.n]
    test = evaluate(model, processor, samples)
    blind = evaluate(model, processor, samples, blank=True)
    majority = synthetic.majority_baseline(samples)
    print(report(test, blind, majority))
    numbers = {
        "test": {k: v for k, v in test.items() if k != "predictions"},
        "blind": {k: v for k, v in blind.items() if k != "predictions"},
        "majority": majority,
    }
    if args.json:
        print(json.dumps(numbers, indent=2))
    return numbers


if __name__ == "__main__":
    main()
