"""Accuracy of the unpatched model against ShortV on the same VQA samples, with batched greedy generation.

Both runs use the same model object (ShortV switched off with `disable_shortv` for the baseline), left padding and
greedy decoding, so the only difference is the frozen layers. Predictions are appended per batch to a JSONL file;
an interrupted run resumes from it, after checking that it had the same model, layers, samples and generation
settings (``eval_run.json``). `evaluate_files` is ``shortv eval`` as a library call: paths in, every check before
the model loads.
"""

from __future__ import annotations

import hashlib
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
from .data import (
    VQASample,
    check_context,
    check_takes_video,
    encode,
    file_sha256,
    load_images,
    load_video_frames,
    prompt_text,
    read_jsonl,
    subsample,
    visual_token_count,
)
from .files import atomic_write_text, exclusive_output
from .fingerprint import WeightsFingerprint, fingerprint_model
from .flops import LayerDims, flops_ratio
from .loading import context_length, inputs_for, load_model, model_id_of, resolve_model
from .patch import apply_shortv, disable_shortv, get_shortv_state
from .processes import is_main_process, main_holds, on_main, process_device_map, process_index, share
from .records import append_records, check_fresh, check_weights, merge_shards, shard_path, start_run
from .registry import find_decoder_layers, visual_token_ids
from .selection import check_matches_model, select_layers

PREDICTIONS_FILE = "predictions.jsonl"
RUN_FILE = "eval_run.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MARKDOWN = "summary.md"
FINAL_FILES = (SUMMARY_JSON, SUMMARY_MARKDOWN)
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
    """Processor outputs for a batch of prompts (with their images and videos), left-padded for generation."""
    tokenizer = processor.tokenizer
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        images = [load_images(sample) for sample in samples]
        videos = [load_video_frames(sample) for sample in samples if sample.video is not None]
        texts = [prompt_text(processor, sample) for sample in samples]
        return dict(encode(processor, texts, images, videos, padding=True))
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
    #: Operator-level layers (`ShortVConfig.attention_layers` / ``mlp_layers``): visual rows skip only that update.
    attention_layers: list[int] = field(default_factory=list)
    mlp_layers: list[int] = field(default_factory=list)

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
        header = f"ShortV layers ({len(self.layers)}): {self.layers}\n"
        if self.attention_layers or self.mlp_layers:
            header += (f"attention-only layers ({len(self.attention_layers)}): {self.attention_layers}\n"
                       f"MLP-only layers ({len(self.mlp_layers)}): {self.mlp_layers}\n")
        return header + "\n" + "\n".join(rows) + "\n"


def _scores(records: list[dict[str, Any]], key: str) -> ModelScores:
    by_type: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        by_type[record["type"] or "all"].append(record[f"{key}_correct"])
    per_type = {kind: sum(values) / len(values) for kind, values in by_type.items()}
    seconds = sum(record[f"{key}_seconds"] for record in records)
    return ModelScores(sum(r[f"{key}_correct"] for r in records) / len(records), per_type, seconds)


def _run_settings(model: Any, config: ShortVConfig, samples: Sequence[VQASample], max_new_tokens: int,
                  model_id: str | None, metadata: dict[str, Any] | None) -> dict[str, Any]:
    """What must not change between an interrupted evaluation and its resumption (batch size may: it changes no
    answer)."""
    ids = "\n".join(sample.id for sample in samples).encode()
    return {
        "model_id": model_id or model_id_of(model) or type(model).__name__,
        "num_layers": len(find_decoder_layers(model)),
        "dtype": str(model.get_input_embeddings().weight.dtype).replace("torch.", ""),
        "shortv_layers": sorted(config.frozen_layers),
        **({"attention_layers": sorted(config.attention_layers), "mlp_layers": sorted(config.mlp_layers)}
           if config.operator_level else {}),
        "mode": config.mode,
        "frozen_tokens": config.frozen_tokens,
        "max_new_tokens": max_new_tokens,
        "num_samples": len(samples),
        "sample_ids_sha256": hashlib.sha256(ids).hexdigest(),
        **(metadata or {}),
    }


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
    model_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    weights: WeightsFingerprint | None = None,
) -> EvalSummary:
    """Baseline vs ShortV on ``samples``. With ``config`` ShortV is applied first; otherwise the model must have it.

    With ``out_dir``: the folder is locked for this run; ``resume=True`` continues from its predictions after
    checking the interrupted run had the same settings (model, layers, samples, ``max_new_tokens``, ``metadata``)
    and the same ``weights`` (`shortv.fingerprint`; default: the fingerprint of the model's tensors in memory).
    Every input's length is checked against the model's context before generating. Under a distributed launcher
    each process generates its share of the samples (`shortv.processes`); every process returns the whole summary,
    and the main process writes the files.
    """
    if not samples:
        raise ValueError("no samples to evaluate")
    missing = [sample for sample in samples if sample.answer is None]
    if missing:
        raise missing[0].error("evaluation needs an 'answer' for every sample")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if config is not None:
        apply_shortv(model, ShortVConfig.coerce(config))
    state = get_shortv_state(model)
    if state is None:
        raise ValueError("give a ShortV config (or apply_shortv first) to compare against the baseline")
    video = next((sample for sample in samples if sample.video is not None), None)
    if video is not None:
        check_takes_video(processor, f"{video.source}: the sample has a video")
    check_context(processor, samples, context_length(model.config), new_tokens=max_new_tokens)
    if out_dir is None:
        return _summarize(model, _predict(model, processor, samples, batch_size, max_new_tokens, None, {}, progress))
    with main_holds(exclusive_output, out_dir) as out_dir:  # several processes: the main one writes the results
        settings = _run_settings(model, state.config, samples, max_new_tokens, model_id, metadata)
        weights = fingerprint_model(model) if weights is None else weights
        done = on_main(start_run, out_dir, PREDICTIONS_FILE, RUN_FILE, settings, resume, FINAL_FILES, weights)
        predictions_path = shard_path(out_dir, PREDICTIONS_FILE, process_index())
        records = _predict(model, processor, samples, batch_size, max_new_tokens, predictions_path, done, progress)
        summary = _summarize(model, records)
        if is_main_process():
            merge_shards(out_dir, PREDICTIONS_FILE, records)
            atomic_write_text(out_dir / SUMMARY_JSON, json.dumps(summary.to_dict(), indent=1) + "\n")
            atomic_write_text(out_dir / SUMMARY_MARKDOWN, summary.markdown())
    return summary


def _predict(
    model: Any, processor: Any, samples: Sequence[VQASample], batch_size: int, max_new_tokens: int,
    predictions_path: Path | None, done: dict[str, dict[str, Any]], progress: bool,
) -> list[dict[str, Any]]:
    """Every sample's record (answers of both models, correctness, tokens, seconds), in sample order: those in
    ``done``, and the others generated now, batch by batch, each batch appended to ``predictions_path``. Several
    processes: each generates its part (`shortv.processes.share`) and all get every record."""
    todo = [sample for sample in samples if sample.id not in done]
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc="evaluating", unit="sample",
               disable=not progress or not is_main_process())

    def predict_part(part: Sequence[VQASample]) -> list[dict[str, Any]]:
        lines = []
        for start in range(0, len(part), batch_size):
            batch = part[start : start + batch_size]
            answers, seconds = {}, {}
            for key in ("baseline", "shortv"):
                with disable_shortv(model) if key == "baseline" else nullcontext():
                    began = time.perf_counter()
                    answers[key], tokens = generate_answers(model, processor, batch, max_new_tokens)
                    seconds[key] = (time.perf_counter() - began) / len(batch)
            batch_lines = []
            for index, sample in enumerate(batch):
                record = {"id": sample.id, "type": sample.type, "answer": sample.answer, **tokens[index]}
                for key in ("baseline", "shortv"):
                    record[key] = answers[key][index]
                    record[f"{key}_correct"] = is_correct(answers[key][index], sample)
                    record[f"{key}_seconds"] = seconds[key]
                batch_lines.append(record)
            if predictions_path is not None:
                append_records(predictions_path, batch_lines)
            lines += batch_lines
            bar.update(len(batch))
        return lines

    with bar:
        predicted = share(todo, predict_part)
        bar.update(len(samples) - bar.n)  # the other processes' samples
    records = {**done, **{record["id"]: record for record in predicted}}
    return [records[sample.id] for sample in samples]


def _summarize(model: Any, records: list[dict[str, Any]]) -> EvalSummary:
    """Accuracy per model and type, agreement and the FLOPs ratio of the model's ShortV layers, over ``records``."""
    state = get_shortv_state(model)
    dims = LayerDims.from_config(model.config)
    text_tokens = max(1, round(sum(r["text_tokens"] for r in records) / len(records)))
    visual_tokens = round(sum(r["visual_tokens"] for r in records) / len(records))
    per_type_counts: dict[str, int] = defaultdict(int)
    for record in records:
        per_type_counts[record["type"] or "all"] += 1
    return EvalSummary(
        num_samples=len(records),
        baseline=_scores(records, "baseline"),
        shortv=_scores(records, "shortv"),
        agreement=sum(normalize_answer(r["baseline"]) == normalize_answer(r["shortv"]) for r in records) / len(records),
        flops_ratio=flops_ratio(dims, text_tokens, visual_tokens, sorted(state.config.frozen_layers), formula="exact",
                                attention_layers=state.config.attention_layers, mlp_layers=state.config.mlp_layers),
        layers=list(state.config.layers),
        per_type_counts=dict(per_type_counts),
        attention_layers=list(state.config.attention_layers),
        mlp_layers=list(state.config.mlp_layers),
    )


def evaluate_files(
    model: str | Path | None = None,
    data: str | Path | None = None,
    config: str | Path | None = None,
    lc: str | Path | None = None,
    n: int | None = None,
    num_samples: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    out_dir: str | Path = "shortv_eval",
    resume: bool = False,
    seed: int = 0,
    dtype: str | None = None,
    device_map: str | None = None,
    trust_remote_code: bool = False,
    allow_other_model: bool = False,
    progress: bool = True,
) -> EvalSummary:
    """``shortv eval``: the model (path, hub id, None for the embedded one) with ``config`` or the first ``n`` layers
    of ``lc``'s order, on ``data`` (default: the embedded test split).

    Checked before the model loads: the flags agree, the config or LC file was made for this model (layer count,
    weights unless ``allow_other_model``), every data line parses and every image opens, the output folder is free.
    """
    from .contribution import LCResult

    if config is not None and lc is not None:
        raise ValueError("give either --config FILE or --lc FILE with --n N, not both")
    if config is not None and n is not None:
        raise ValueError("--n goes with --lc (the first N layers of its order); --config FILE already lists its layers")
    if config is None and (lc is None or n is None):
        raise ValueError("give either --config FILE or --lc FILE with --n N")
    source = resolve_model(model, trust_remote_code)
    if config is not None:
        shortv_config = ShortVConfig.load(config)
        check_matches_model(shortv_config, source.num_layers, source.model_id, str(config), allow_other_model,
                            source.fingerprint)
    else:
        lc_result = LCResult.load(lc)
        check_matches_model(lc_result, source.num_layers, source.model_id, str(lc), allow_other_model,
                            source.fingerprint)
        shortv_config = select_layers(lc_result, n=n)
        shortv_config.provenance["lc"] = str(lc)
    if data is None:
        from .tiny import embedded_split_path

        data = embedded_split_path("test")
    samples = subsample(read_jsonl(data, require_answer=True), num_samples, seed)
    with main_holds(exclusive_output, out_dir) as out_dir:
        if not resume:
            on_main(check_fresh, out_dir, (PREDICTIONS_FILE, *FINAL_FILES))
        else:  # other weights than the interrupted run's: refused before they load
            on_main(check_weights, out_dir, RUN_FILE, source.fingerprint)
        loaded, processor, model_id = load_model(source, dtype=dtype, device_map=process_device_map(device_map))
        metadata = {"data": str(Path(data).resolve()), "data_sha256": file_sha256(data), "seed": seed,
                    "num_samples_requested": num_samples}
        return evaluate(loaded, processor, samples, shortv_config, batch_size=batch_size,
                        max_new_tokens=max_new_tokens, out_dir=out_dir, resume=resume, progress=progress,
                        model_id=model_id, metadata=metadata, weights=source.fingerprint)
