"""Accuracy of the unpatched model against one or several methods (ShortV, FastV, VTW, ShortV + FastV...: see
`shortv.methods`) on the same VQA samples, with batched greedy generation.

Every run uses the same model object: each batch is answered by the unpatched model, then by each method in turn
(applied, generated, removed: `remove_*` is bit-exact), with left padding and greedy decoding, so the only
difference is the method. Predictions are appended per batch to a JSONL file; an interrupted run resumes from it,
after checking that it had the same model, methods and their parameters, samples and generation settings
(``eval_run.json``). `evaluate_files` is ``shortv eval`` as a library call: paths in, every check before the model
loads.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import time
from collections import defaultdict
from collections.abc import Sequence
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
from .flops import LayerDims
from .loading import context_length, inputs_for, load_model, model_id_of, resolve_model
from .methods import (
    MethodRun,
    applied_config,
    describe_record,
    load_config,
    parse_spec,
    plan_runs,
    runs_of,
    without_method,
)
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
class MethodSummary:
    """One method's row: ``key`` names its answers in predictions.jsonl, ``method`` is its record (name and every
    parameter, `shortv.methods.Method.record`)."""

    key: str
    method: dict[str, Any]
    scores: ModelScores
    agreement: float
    flops_ratio: float


@dataclass
class EvalSummary:
    """The baseline and one row per method. ``shortv``, ``agreement``, ``flops_ratio``, ``layers``,
    ``attention_layers`` and ``mlp_layers`` repeat the first method's (the fields of a one-method summary)."""

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
    methods: list[MethodSummary] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        kinds = sorted(self.per_type_counts)
        columns = ["prefill FLOPs", f"accuracy (n={self.num_samples})",
                   *(f"{kind} (n={self.per_type_counts[kind]})" for kind in kinds), "answers agreeing",
                   "generation time"]
        rows = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]

        def row(name: str, scores: ModelScores, flops: float, agreement: str) -> str:
            cells = [f"{100 * flops:.1f}%", f"{100 * scores.accuracy:.1f}%",
                     *(f"{100 * scores.per_type[kind]:.1f}%" for kind in kinds), agreement, f"{scores.seconds:.2f} s"]
            return f"| {name} | " + " | ".join(cells) + " |"

        rows.append(row("baseline", self.baseline, 1.0, ""))
        rows += [row(m.key, m.scores, m.flops_ratio, f"{100 * m.agreement:.1f}%") for m in self.methods]
        header = "".join(f"- {m.key}: {describe_record(m.method)}\n" for m in self.methods)
        return header + "\n" + "\n".join(rows) + "\n"


def _scores(records: list[dict[str, Any]], key: str) -> ModelScores:
    by_type: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        by_type[record["type"] or "all"].append(record[f"{key}_correct"])
    per_type = {kind: sum(values) / len(values) for kind, values in by_type.items()}
    seconds = sum(record[f"{key}_seconds"] for record in records)
    return ModelScores(sum(r[f"{key}_correct"] for r in records) / len(records), per_type, seconds)


def _run_settings(model: Any, runs: Sequence[MethodRun], samples: Sequence[VQASample], max_new_tokens: int,
                  model_id: str | None, metadata: dict[str, Any] | None) -> dict[str, Any]:
    """What must not change between an interrupted evaluation and its resumption (batch size may: it changes no
    answer). Each method's record is flattened (``fastv.ratio``), so a refusal names the parameter that differs."""
    ids = "\n".join(sample.id for sample in samples).encode()
    return {
        "model_id": model_id or model_id_of(model) or type(model).__name__,
        "num_layers": len(find_decoder_layers(model)),
        "dtype": str(model.get_input_embeddings().weight.dtype).replace("torch.", ""),
        "methods": [run.key for run in runs],
        **{f"{run.key}.{name}": value for run in runs for name, value in run.record.items()},
        "max_new_tokens": max_new_tokens,
        "num_samples": len(samples),
        "sample_ids_sha256": hashlib.sha256(ids).hexdigest(),
        **(metadata or {}),
    }


def _check_runs(model: Any, runs: Sequence[MethodRun]) -> None:
    """Each method applies to this model (family, K, layers: its own checks) before anything is generated."""
    for run in runs:
        if run.method.needs_visual_ids and not visual_token_ids(model):
            raise ValueError(f"{run.method.name} needs the visual positions: {type(model).__name__} declares no visual "
                             "token ids (a bare LM); use the Python API with visual_mask= (docs/pruning.md)")
        try:
            run.method.apply(model, run.config)
        except ValueError as error:
            raise ValueError(f"{run.describe()}: {error}") from None
        run.method.remove(model)


def evaluate(
    model: Any,
    processor: Any,
    samples: Sequence[VQASample],
    config: Any = None,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    model_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    weights: WeightsFingerprint | None = None,
) -> EvalSummary:
    """The unpatched model vs each method of ``config`` on ``samples``: one config of any method (`ShortVConfig`,
    `shortv.pruning.TokenPruningConfig`), a list of layer indices (ShortV), or a list of configs (one row each) or
    of `shortv.methods.MethodRun` objects.
    Without ``config``, the method applied to the model. The model is left as it came.

    With ``out_dir``: the folder is locked for this run; ``resume=True`` continues from its predictions after
    checking the interrupted run had the same settings (model, methods and their parameters, samples,
    ``max_new_tokens``, ``metadata``) and the same ``weights`` (`shortv.fingerprint`; default: the fingerprint of the
    model's tensors in memory). Every input's length is checked against the model's context, and every method
    against the model, before generating. Under a distributed launcher each process generates its share of the
    samples (`shortv.processes`); every process returns the whole summary, and the main process writes the files.
    """
    if not samples:
        raise ValueError("no samples to evaluate")
    missing = [sample for sample in samples if sample.answer is None]
    if missing:
        raise missing[0].error("evaluation needs an 'answer' for every sample")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if config is None:
        config = applied_config(model)
        if config is None:
            raise ValueError("give a config (ShortV, FastV, VTW...) or apply one first to compare against the baseline")
    runs = runs_of(config)
    video = next((sample for sample in samples if sample.video is not None), None)
    if video is not None:
        check_takes_video(processor, f"{video.source}: the sample has a video")
    check_context(processor, samples, context_length(model.config), new_tokens=max_new_tokens)
    with without_method(model):
        _check_runs(model, runs)
        if out_dir is None:
            return _summarize(model, runs, _predict(model, processor, samples, runs, batch_size, max_new_tokens, None,
                                                    {}, progress))
        with main_holds(exclusive_output, out_dir) as out_dir:  # several processes: the main one writes the results
            settings = _run_settings(model, runs, samples, max_new_tokens, model_id, metadata)
            weights = fingerprint_model(model) if weights is None else weights
            done = on_main(start_run, out_dir, PREDICTIONS_FILE, RUN_FILE, settings, resume, FINAL_FILES, weights)
            predictions_path = shard_path(out_dir, PREDICTIONS_FILE, process_index())
            records = _predict(model, processor, samples, runs, batch_size, max_new_tokens, predictions_path, done,
                               progress)
            summary = _summarize(model, runs, records)
            if is_main_process():
                merge_shards(out_dir, PREDICTIONS_FILE, records)
                atomic_write_text(out_dir / SUMMARY_JSON, json.dumps(summary.to_dict(), indent=1) + "\n")
                atomic_write_text(out_dir / SUMMARY_MARKDOWN, summary.markdown())
        return summary


def _predict(
    model: Any, processor: Any, samples: Sequence[VQASample], runs: Sequence[MethodRun], batch_size: int,
    max_new_tokens: int, predictions_path: Path | None, done: dict[str, dict[str, Any]], progress: bool,
) -> list[dict[str, Any]]:
    """Every sample's record (answers of the baseline and of each method, correctness, tokens, seconds), in sample
    order: those in ``done``, and the others generated now, batch by batch, each batch appended to
    ``predictions_path``. The model comes unpatched; each method is applied for its answers and removed. Several
    processes: each generates its part (`shortv.processes.share`) and all get every record."""
    todo = [sample for sample in samples if sample.id not in done]
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc="evaluating", unit="sample",
               disable=not progress or not is_main_process())

    def answer(batch: Sequence[VQASample]) -> tuple[list[str], list[dict[str, int]], float]:
        began = time.perf_counter()
        answers, tokens = generate_answers(model, processor, batch, max_new_tokens)
        return answers, tokens, (time.perf_counter() - began) / len(batch)

    def predict_part(part: Sequence[VQASample]) -> list[dict[str, Any]]:
        lines = []
        for start in range(0, len(part), batch_size):
            batch = part[start : start + batch_size]
            answers, seconds = {}, {}
            answers["baseline"], tokens, seconds["baseline"] = answer(batch)
            for run in runs:
                run.method.apply(model, run.config)
                try:
                    answers[run.key], _, seconds[run.key] = answer(batch)
                finally:
                    run.method.remove(model)
            batch_lines = []
            for index, sample in enumerate(batch):
                record = {"id": sample.id, "type": sample.type, "answer": sample.answer, **tokens[index]}
                for key in answers:
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


def _summarize(model: Any, runs: Sequence[MethodRun], records: list[dict[str, Any]]) -> EvalSummary:
    """Accuracy per model and type, agreement with the baseline and each method's prefill FLOPs ratio (at the mean
    token counts of ``records``)."""
    dims = LayerDims.from_config(model.config)
    text_tokens = max(1, round(sum(r["text_tokens"] for r in records) / len(records)))
    visual_tokens = round(sum(r["visual_tokens"] for r in records) / len(records))
    per_type_counts: dict[str, int] = defaultdict(int)
    for record in records:
        per_type_counts[record["type"] or "all"] += 1
    methods = [
        MethodSummary(
            key=run.key, method=run.record, scores=_scores(records, run.key),
            agreement=sum(normalize_answer(r["baseline"]) == normalize_answer(r[run.key]) for r in records)
            / len(records),
            flops_ratio=run.method.flops_ratio(dims, text_tokens, visual_tokens, run.config),
        )
        for run in runs
    ]
    first = methods[0]
    return EvalSummary(
        num_samples=len(records),
        baseline=_scores(records, "baseline"),
        shortv=first.scores,
        agreement=first.agreement,
        flops_ratio=first.flops_ratio,
        layers=list(first.method.get("layers", [])),
        per_type_counts=dict(per_type_counts),
        attention_layers=list(first.method.get("attention_layers", [])),
        mlp_layers=list(first.method.get("mlp_layers", [])),
        methods=methods,
    )


def evaluate_files(
    model: str | Path | None = None,
    data: str | Path | None = None,
    config: str | Path | Sequence[str | Path] | None = None,
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
    methods: Sequence[str] = (),
    k: int | None = None,
    ratio: float | None = None,
    rank: str | None = None,
) -> EvalSummary:
    """``shortv eval``: the model (path, hub id, None for the embedded one) on ``data`` (default: the embedded test
    split), unpatched and with each method: every ``config`` file (ShortV or token pruning: one method each), the
    first ``n`` layers of ``lc``'s order (ShortV, when no ``methods`` are given), and each ``methods`` spec
    (``fastv:k=2,ratio=0.5``: `shortv.methods.plan`; ``k``/``ratio``/``rank`` fill what a spec leaves out).

    Checked before the model loads: the flags agree, every method's parameters, the config and LC files were made
    for this model (layer count, weights unless ``allow_other_model``), every data line parses and every image
    opens, the output folder is free.
    """
    from .contribution import LCResult

    paths = [] if config is None else [config] if isinstance(config, (str, Path)) else list(config)
    methods = list(methods)
    if n is not None and lc is None:
        raise ValueError("--n goes with --lc (the first N layers of its order); --config FILE already lists its layers"
                         if paths else "give either --config FILE or --lc FILE with --n N")
    parsed = [parse_spec(spec) for spec in methods]
    if lc is not None and n is None and not any("n" in values for _, values in parsed):
        raise ValueError("give either --config FILE or --lc FILE with --n N")
    if not paths and lc is None and not methods:
        raise ValueError("give either --config FILE or --lc FILE with --n N (or --method)")
    source = resolve_model(model, trust_remote_code)
    configs = []
    for path in paths:
        loaded = load_config(path)
        if isinstance(loaded, ShortVConfig):
            check_matches_model(loaded, source.num_layers, source.model_id, str(path), allow_other_model,
                                source.fingerprint)
        configs.append(loaded)
    shortv, first_n = None, None
    if lc is not None:
        lc_result = LCResult.load(lc)
        check_matches_model(lc_result, source.num_layers, source.model_id, str(lc), allow_other_model,
                            source.fingerprint)

        def first_n(count: int) -> ShortVConfig:
            chosen = select_layers(lc_result, n=count)
            chosen.provenance["lc"] = str(lc)
            return chosen

        if n is not None:
            shortv = first_n(n)
            if not methods:
                configs.append(shortv)
            elif not any("layers" in method.parameters for method, _ in parsed):
                raise ValueError("--lc/--n give ShortV layers, but none of the --method specs takes them; add "
                                 "--method shortv")
    runs = plan_runs(methods, configs, shortv, first_n, k, ratio, rank)
    for run in runs:
        run.method.check(run.config, source.num_layers)
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
        return evaluate(loaded, processor, samples, runs, batch_size=batch_size,
                        max_new_tokens=max_new_tokens, out_dir=out_dir, resume=resume, progress=progress,
                        model_id=model_id, metadata=metadata, weights=source.fingerprint)

