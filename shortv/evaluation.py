"""Accuracy of the unpatched model against ShortV on the same VQA samples, with batched greedy generation.

Both runs use the same model object (ShortV switched off with `disable_shortv` for the baseline), left padding and
greedy decoding, so the only difference is the frozen layers. Predictions are appended per batch to a JSONL file;
an interrupted run resumes from it.
"""

from __future__ import annotations

import json
import re
import string
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import ShortVConfig
from .data import VQASample, load_images, prompt_text, visual_token_count
from .flops import LayerDims, flops_ratio
from .loading import inputs_for
from .patch import apply_shortv, disable_shortv, get_shortv_state
from .records import append_records, read_records
from .registry import visual_token_ids

PREDICTIONS_FILE = "predictions.jsonl"
SUMMARY_JSON = "summary.json"
SUMMARY_MARKDOWN = "summary.md"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces: VQA-style normalized exact match."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def extract_choice(text: str, choices: Sequence[str]) -> str | None:
    """The option letter a free-form answer picks ("B", "(b)", "Answer: B.", or the option's text), or None."""
    letters = [chr(65 + index) for index in range(len(choices))]
    stripped = text.strip()
    match = re.match(r"^\(?([A-Za-z])[\).:\s]", stripped + " ")
    if match and match.group(1).upper() in letters:
        return match.group(1).upper()
    match = re.search(r"answer(?: is)?\s*[:\-]?\s*\(?([A-Za-z])\b", stripped, flags=re.IGNORECASE)
    if match and match.group(1).upper() in letters:
        return match.group(1).upper()
    normalized = normalize_answer(stripped)
    for letter, choice in zip(letters, choices):
        if normalized and normalized == normalize_answer(choice):
            return letter
    return None


def is_correct(prediction: str, sample: VQASample) -> bool:
    if sample.answer is None:
        raise sample.error("evaluation needs an 'answer'")
    if sample.choices:
        expected = sample.answer.strip()
        if len(expected) != 1 or not expected.isalpha():
            expected = extract_choice(expected, sample.choices) or expected
        return extract_choice(prediction, sample.choices) == expected.upper()
    return normalize_answer(prediction) == normalize_answer(sample.answer)


def batch_inputs(processor: Any, samples: Sequence[VQASample]) -> dict[str, Any]:
    """Processor outputs for a batch of prompts, left-padded for generation.

    Images go in as one list per prompt: processors that check each prompt's image count (Gemma 3, SmolVLM) need
    that nesting, and all others accept it."""
    tokenizer = processor.tokenizer
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        images = [load_images(sample) for sample in samples]
        texts = [prompt_text(processor, sample) for sample in samples]
        return dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))
    finally:
        tokenizer.padding_side = previous_side


def token_counts(processor: Any, batch: dict[str, Any], token_ids: Sequence[int] = ()) -> list[dict[str, int]]:
    """Per sample: visual and text (non-padding) tokens, for the FLOPs model (``token_ids``: the model's visual
    token ids; marker tokens such as image start/end or row breaks are text)."""
    visual = [visual_token_count(processor, row, token_ids) for row in batch["input_ids"]]
    real = batch["attention_mask"].sum(dim=1).tolist()
    return [{"visual_tokens": v, "text_tokens": int(r) - v} for v, r in zip(visual, real)]


@torch.no_grad()
def generate_answers(
    model: Any, processor: Any, samples: Sequence[VQASample], max_new_tokens: int = 8
) -> tuple[list[str], list[dict[str, int]]]:
    """Greedy answers for one batch (left padding), and each sample's token counts for the FLOPs model."""
    tokenizer = processor.tokenizer
    batch = batch_inputs(processor, samples)
    inputs = inputs_for(model, batch)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                            pad_token_id=tokenizer.pad_token_id)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    answers = [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers, token_counts(processor, batch, visual_token_ids(model))


@dataclass
class ModelScores:
    accuracy: float
    per_type: dict[str, float]
    seconds: float


@dataclass
class EvalSummary:
    num_samples: int
    baseline: ModelScores
    shortv: ModelScores
    agreement: float
    flops_ratio: float
    layers: list[int]
    per_type_counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        rows = [
            "| | baseline | ShortV |",
            "|---|---|---|",
            f"| accuracy (n={self.num_samples}) | {100 * self.baseline.accuracy:.1f}% | {100 * self.shortv.accuracy:.1f}% |",
        ]
        for kind in sorted(self.per_type_counts):
            rows.append(f"| {kind} (n={self.per_type_counts[kind]}) | {100 * self.baseline.per_type[kind]:.1f}% | "
                        f"{100 * self.shortv.per_type[kind]:.1f}% |")
        rows += [
            f"| generation time | {self.baseline.seconds:.2f} s | {self.shortv.seconds:.2f} s |",
            f"| prefill FLOPs | 100% | {100 * self.flops_ratio:.1f}% |",
            f"| answers agreeing | | {100 * self.agreement:.1f}% |",
        ]
        return f"ShortV layers ({len(self.layers)}): {self.layers}\n\n" + "\n".join(rows) + "\n"


def _scores(records: list[dict[str, Any]], key: str) -> ModelScores:
    by_type: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        by_type[record["type"] or "all"].append(record[f"{key}_correct"])
    per_type = {kind: sum(values) / len(values) for kind, values in by_type.items()}
    seconds = sum(record[f"{key}_seconds"] for record in records)
    return ModelScores(sum(r[f"{key}_correct"] for r in records) / len(records), per_type, seconds)


def evaluate(
    model: Any,
    processor: Any,
    samples: Sequence[VQASample],
    config: ShortVConfig | Sequence[int] | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> EvalSummary:
    """Baseline vs ShortV on ``samples``. With ``config`` ShortV is applied first; otherwise the model must have it."""
    if not samples:
        raise ValueError("no samples to evaluate")
    missing = [sample for sample in samples if sample.answer is None]
    if missing:
        raise missing[0].error("evaluation needs an 'answer' for every sample")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if config is not None:
        apply_shortv(model, config)
    state = get_shortv_state(model)
    if state is None:
        raise ValueError("give a ShortV config (or apply_shortv first) to compare against the baseline")

    done: dict[str, dict[str, Any]] = {}
    predictions_path = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        predictions_path = out_dir / PREDICTIONS_FILE
        if predictions_path.exists() and not resume:
            raise FileExistsError(f"{predictions_path} exists; pass resume=True (--resume) or another folder")
        done = read_records(predictions_path) if resume else {}

    todo = [sample for sample in samples if sample.id not in done]
    with tqdm(total=len(samples), initial=len(samples) - len(todo), desc="evaluating", unit="sample",
              disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            answers, seconds = {}, {}
            for key in ("baseline", "shortv"):
                with disable_shortv(model) if key == "baseline" else nullcontext():
                    began = time.perf_counter()
                    answers[key], tokens = generate_answers(model, processor, batch, max_new_tokens)
                    seconds[key] = (time.perf_counter() - began) / len(batch)
            lines = []
            for index, sample in enumerate(batch):
                record = {"id": sample.id, "type": sample.type, "answer": sample.answer, **tokens[index]}
                for key in ("baseline", "shortv"):
                    record[key] = answers[key][index]
                    record[f"{key}_correct"] = is_correct(answers[key][index], sample)
                    record[f"{key}_seconds"] = seconds[key]
                done[sample.id] = record
                lines.append(record)
            if predictions_path is not None:
                append_records(predictions_path, lines)
            bar.update(len(batch))

    records = [done[sample.id] for sample in samples]
    dims = LayerDims.from_config(model.config)
    text_tokens = max(1, round(sum(r["text_tokens"] for r in records) / len(records)))
    visual_tokens = round(sum(r["visual_tokens"] for r in records) / len(records))
    per_type_counts: dict[str, int] = defaultdict(int)
    for record in records:
        per_type_counts[record["type"] or "all"] += 1
    summary = EvalSummary(
        num_samples=len(records),
        baseline=_scores(records, "baseline"),
        shortv=_scores(records, "shortv"),
        agreement=sum(normalize_answer(r["baseline"]) == normalize_answer(r["shortv"]) for r in records) / len(records),
        flops_ratio=flops_ratio(dims, text_tokens, visual_tokens, sorted(state.config.frozen_layers), formula="exact"),
        layers=list(state.config.layers),
        per_type_counts=dict(per_type_counts),
    )
    if out_dir is not None:
        (out_dir / SUMMARY_JSON).write_text(json.dumps(summary.to_dict(), indent=1) + "\n")
        (out_dir / SUMMARY_MARKDOWN).write_text(summary.markdown())
    return summary
