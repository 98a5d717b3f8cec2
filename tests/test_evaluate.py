"""Scoring, batched generation and resumable baseline-vs-ShortV evaluation on the tiny LLaVA architecture."""

import json

import pytest
import torch

from shortv import ShortVConfig, remove_shortv
from shortv.data import VQASample, read_jsonl
from shortv.evaluation import evaluate, extract_choice, generate_answers, is_correct, normalize_answer
from shortv.tiny import build, synthetic


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build.build_model(seed=0).eval()
    return model, build.build_processor()


@pytest.fixture(scope="module")
def test_samples(tmp_path_factory):
    return read_jsonl(synthetic.write_split("test", tmp_path_factory.mktemp("test"), n=6))


def sample(answer, choices=None):
    return VQASample(id="x", images=[], prompt="q", answer=answer, choices=choices, source="f.jsonl:1")


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [("Red.", "red", True), ("the Red", "red", True), ("an apple!", "Apple", True), ("  two ", "two", True),
     ("reddish", "red", False), ("blue", "red", False)],
)
def test_normalized_exact_match(prediction, answer, expected):
    assert is_correct(prediction, sample(answer)) is expected


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [("B", "B"), ("(b)", "B"), ("B. blue", "B"), ("The answer is C", "C"), ("Answer: a", "A"), ("blue", "B"),
     ("purple", None), ("E", None)],
)
def test_choice_letter_extraction(prediction, letter):
    assert extract_choice(prediction, ["red", "blue", "green"]) == letter


def test_choice_scoring_accepts_letter_or_text_answers():
    assert is_correct("(B)", sample("B", ["red", "blue"]))
    assert is_correct("B", sample("blue", ["red", "blue"]))
    assert not is_correct("A", sample("blue", ["red", "blue"]))
    assert normalize_answer("The  Cat, sat.") == "cat sat"


def test_batched_generation_equals_batch_of_one(tiny, test_samples):
    model, processor = tiny
    batched, tokens = generate_answers(model, processor, test_samples[:4], max_new_tokens=4)
    alone = [generate_answers(model, processor, [s], max_new_tokens=4)[0][0] for s in test_samples[:4]]
    assert batched == alone
    assert all(t["visual_tokens"] == build.IMAGE_TOKENS for t in tokens)


def test_empty_config_predictions_identical_to_baseline(tiny, test_samples):
    model, processor = tiny
    summary = evaluate(model, processor, test_samples, ShortVConfig([]), batch_size=3, progress=False)
    remove_shortv(model)
    assert summary.agreement == 1.0 and summary.flops_ratio == 1.0
    assert summary.baseline.accuracy == summary.shortv.accuracy


def test_resume_after_interruption_gives_same_summary(tiny, test_samples, tmp_path, monkeypatch):
    import shortv.evaluation as evaluation

    model, processor = tiny
    config = ShortVConfig(list(range(2, 12)))
    full = evaluate(model, processor, test_samples, config, batch_size=2, out_dir=tmp_path / "full", progress=False)
    assert full.flops_ratio < 1.0 and full.layers == list(range(2, 12))

    real_generate, calls = evaluation.generate_answers, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # third batch's baseline
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(evaluation, "generate_answers", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, processor, test_samples, config, batch_size=2, out_dir=tmp_path / "cut", progress=False)
    monkeypatch.setattr(evaluation, "generate_answers", real_generate)
    assert len((tmp_path / "cut" / "predictions.jsonl").read_text().splitlines()) == 4
    with pytest.raises(FileExistsError, match="pass resume=True"):
        evaluate(model, processor, test_samples, config, out_dir=tmp_path / "cut", progress=False)
    resumed = evaluate(model, processor, test_samples, config, batch_size=2, out_dir=tmp_path / "cut", resume=True,
                       progress=False)
    remove_shortv(model)

    def without_times(summary):
        data = summary.to_dict()
        for key in ("baseline", "shortv"):
            data[key].pop("seconds")
        return data

    assert without_times(resumed) == without_times(full)
    saved = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert saved["num_samples"] == 6
    assert "| accuracy (n=6) |" in (tmp_path / "cut" / "summary.md").read_text()


def test_bad_input(tiny, test_samples, tmp_path):
    model, processor = tiny
    no_answer = VQASample(id="q7", images=test_samples[0].images, prompt="q", source="data.jsonl:7")
    with pytest.raises(ValueError, match="data.jsonl:7: evaluation needs an 'answer'"):
        evaluate(model, processor, [no_answer], ShortVConfig([1]), progress=False)
    with pytest.raises(ValueError, match="no samples"):
        evaluate(model, processor, [], ShortVConfig([1]), progress=False)
    broken = VQASample(id="b", images=[tmp_path / "missing.png"], prompt="q", answer="red", source="data.jsonl:3")
    with pytest.raises(ValueError, match=r"data.jsonl:3: cannot read image .*missing.png"):
        evaluate(model, processor, test_samples[:2] + [broken], ShortVConfig([1]), batch_size=2,
                 out_dir=tmp_path / "partial", progress=False)
    remove_shortv(model)
    assert len((tmp_path / "partial" / "predictions.jsonl").read_text().splitlines()) == 2  # kept
