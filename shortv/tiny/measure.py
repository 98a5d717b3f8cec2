"""Accuracy of the embedded tiny LLaVA on its synthetic test split, and the paper's ablation on it.

``python -m shortv.tiny.measure`` prints the test accuracy (overall and per
question type, greedy decoding), the blind control (same questions, blank
image) and the majority-class baseline per type.  With ``--ablation`` it also
runs the demo's ablation at the paper's operating point (the N whose prefill
FLOPs are closest to 55%) on the same questions and checks it against the
targets the embedded model is trained to meet (:data:`TARGETS`);
``--write-metrics`` records all of it in the checkpoint's ``metrics.json``.
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

__all__ = ["TARGETS", "ablation_targets", "evaluate", "normalize_answer", "report", "main"]

#: What the embedded model must show (issue #15), as (name, description); checked by :func:`ablation_targets`.
TARGETS = (
    ("unpatched", "unpatched accuracy >= 85%"),
    ("blind", "blind control within 15 points of majority-class guessing"),
    ("lc_kept", "LC-ranked ShortV keeps >= 97% of the unpatched accuracy"),
    ("random_gap", "mean of the random selections >= 5 points below LC-ranked"),
    ("first_gap", "first-N >= 15 points below LC-ranked"),
    ("text_frozen", "LC-ranked layers with text tokens frozen <= 10 points above the blind control"),
)


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


def ablation_targets(report) -> dict:  # noqa: ANN001 - shortv.demo.DemoReport
    """The numbers behind :data:`TARGETS` at the report's operating N, each with ``ok``."""
    n = report.operating_n
    unpatched, blind = report.row("unpatched").accuracy, report.row("blind").accuracy
    lc, first, text = report.row("lc", n).accuracy, report.row("first", n).accuracy, report.row("lc_text", n).accuracy
    randoms = [r.accuracy for r in report.random_rows(n)]
    random_mean = sum(randoms) / len(randoms)
    values = {
        "unpatched": (unpatched, unpatched >= 0.85),
        "blind": (blind - report.majority, abs(blind - report.majority) <= 0.15),
        "lc_kept": (lc / unpatched, lc >= 0.97 * unpatched),
        "random_gap": (lc - random_mean, lc - random_mean >= 0.05),
        "first_gap": (lc - first, lc - first >= 0.15),
        "text_frozen": (text - blind, text - blind <= 0.10),
    }
    return {
        "n": n,
        "flops_ratio": report.row("lc", n).flops_ratio,
        "num_test": report.num_test,
        "accuracy": {"unpatched": unpatched, "blind": blind, "majority": report.majority, "lc": lc,
                     "random_mean": random_mean, "random_min": min(randoms), "random_max": max(randoms),
                     "first": first, "last": report.row("last", n).accuracy, "lc_text": text},
        "lc_layers": report.row("lc", n).layers,
        "targets": {key: {"value": round(value, 4), "ok": ok} for key, (value, ok) in values.items()},
    }


def targets_report(numbers: dict) -> str:
    """A plain-text table of :func:`ablation_targets`."""
    acc = numbers["accuracy"]
    lines = [f"ablation at N = {numbers['n']} ({100 * numbers['flops_ratio']:.0f}% of the prefill FLOPs), "
             f"{numbers['num_test']} test questions; LC-ranked layers {numbers['lc_layers']}"]
    lines += [f"  {key:<12}{100 * value:6.1f}" for key, value in acc.items()]
    for key, description in TARGETS:
        t = numbers["targets"][key]
        scale = 1 if key == "lc_kept" else 100
        lines.append(f"  [{'ok' if t['ok'] else 'MISSED'}] {description}: {scale * t['value']:.3g}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m shortv.tiny.measure", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the embedded one)")
    ap.add_argument("--n", type=int, default=None, help="only the first N test questions")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON as well")
    ap.add_argument("--ablation", action="store_true",
                    help="also run the demo's ablation at the 55%%-FLOPs N on the same questions and check the targets")
    ap.add_argument("--num-calib", type=int, default=32, help="LC calibration samples for --ablation")
    ap.add_argument("--out", default=None, help="folder for the ablation's demo files (default: a temporary one)")
    ap.add_argument("--write-metrics", action="store_true",
                    help="record the numbers in the checkpoint's metrics.json (key 'measured')")
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
    if args.ablation:
        numbers["ablation"] = _ablation(args, len(samples))
        print(targets_report(numbers["ablation"]))
    if args.json:
        print(json.dumps(numbers, indent=2))
    if args.write_metrics:
        from pathlib import Path

        from . import embedded_model_path

        path = Path(args.model or embedded_model_path()) / "metrics.json"
        metrics = json.loads(path.read_text()) if path.is_file() else {}
        metrics["measured"] = numbers
        path.write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"wrote {path}")
    return numbers


def _ablation(args, num_test: int) -> dict:  # noqa: ANN001
    import tempfile

    from ..demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        report = run_demo(args.out or tmp, num_calib=args.num_calib, num_test=num_test, speed_repeats=0,
                          model_path=args.model, operating_only=True)
    return ablation_targets(report)


if __name__ == "__main__":
    main()
