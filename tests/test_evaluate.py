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


def interrupt_generation(monkeypatch, on_call):
    """Like Ctrl-C: the ``on_call``-th call of generate_answers (two per batch: baseline, ShortV) raises."""
    import shortv.evaluation as evaluation

    real_generate, calls = evaluation.generate_answers, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == on_call:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(evaluation, "generate_answers", interrupted)
    return real_generate


def test_resume_after_interruption_gives_same_summary(tiny, test_samples, tmp_path, monkeypatch):
    import shortv.evaluation as evaluation

    model, processor = tiny
    config = ShortVConfig(list(range(2, 12)))
    full = evaluate(model, processor, test_samples, config, batch_size=2, out_dir=tmp_path / "full", progress=False)
    assert full.flops_ratio < 1.0 and full.layers == list(range(2, 12))

    real_generate = interrupt_generation(monkeypatch, on_call=5)  # third batch's baseline
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, processor, test_samples, config, batch_size=2, out_dir=tmp_path / "cut", progress=False)
    monkeypatch.setattr(evaluation, "generate_answers", real_generate)
    assert len((tmp_path / "cut" / "predictions.jsonl").read_text().splitlines()) == 4
    with pytest.raises(FileExistsError, match=r"already holds results \(predictions.jsonl\); .*rerun with --resume"):
        evaluate(model, processor, test_samples, config, out_dir=tmp_path / "cut", progress=False)
    resumed = evaluate(model, processor, test_samples, config, batch_size=2, out_dir=tmp_path / "cut", resume=True,
                       progress=False)
    remove_shortv(model)

    def without_times(summary):
        data = summary.to_dict()
        for scores in (data["baseline"], data["shortv"], *(row["scores"] for row in data["methods"])):
            scores.pop("seconds")
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
    assert not (tmp_path / "partial" / "predictions.jsonl").exists()  # refused before any generation


def test_resume_refuses_a_different_setup_naming_what_differs(tiny, test_samples, tmp_path, monkeypatch):
    import shortv.evaluation as evaluation

    model, processor = tiny
    config = ShortVConfig([2, 3])
    interrupt_generation(monkeypatch, on_call=3)  # second batch's baseline
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, processor, test_samples[:2], config, batch_size=1, max_new_tokens=2, out_dir=tmp_path,
                 progress=False, metadata={"data": "/data/test.jsonl"})
    monkeypatch.setattr(evaluation, "generate_answers", lambda *a, **k: pytest.fail("resumed a different setup"))
    before = (tmp_path / "predictions.jsonl").read_text()
    cases = [
        (dict(config=ShortVConfig([2, 4])), r"shortv.layers: \[2, 3\] before, \[2, 4\] now"),
        (dict(max_new_tokens=3), r"max_new_tokens: 2 before, 3 now"),
        (dict(samples=test_samples[:3]), r"num_samples: 2 before, 3 now; sample_ids_sha256: "),
        (dict(metadata={"data": "/data/other.jsonl"}), r"data: '/data/test.jsonl' before, '/data/other.jsonl' now"),
        (dict(model_id="other/model"), r"model_id: .* before, 'other/model' now"),
    ]
    for change, message in cases:
        arguments = {**dict(samples=test_samples[:2], config=config, max_new_tokens=2,
                            metadata={"data": "/data/test.jsonl"}), **change}
        with pytest.raises(ValueError, match=rf"cannot resume .*: the interrupted run had other settings \(.*{message}"):
            evaluate(model, processor, batch_size=1, out_dir=tmp_path, resume=True, progress=False, **arguments)
    remove_shortv(model)
    assert (tmp_path / "predictions.jsonl").read_text() == before


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A 12-layer tiny LLaVA checkpoint folder as evaluate_files sees it before loading: its config."""
    folder = tmp_path_factory.mktemp("model")
    build.build_model(seed=0).config.save_pretrained(folder)
    return folder


def test_config_and_lc_files_are_checked_against_the_model_before_it_loads(model_folder, tmp_path, monkeypatch):
    import shortv.evaluation as evaluation
    from shortv.contribution import LCResult

    class Loaded(Exception):
        pass

    def stop_at_loading(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(evaluation, "load_model", stop_at_loading)
    data = synthetic.write_split("test", tmp_path / "data", n=2)

    def run(**kwargs):
        return evaluation.evaluate_files(str(model_folder), data=data, out_dir=tmp_path / "out", progress=False,
                                         **kwargs)

    def lc_file(num_layers, model_id, name):
        lc = LCResult(num_layers=num_layers, token_types=("visual",), sample_ids=["a"],
                      per_sample={"visual": [[0.1 * layer for layer in range(num_layers)]]}, model_id=model_id)
        return lc.save(tmp_path / name)

    with pytest.raises(ValueError, match=r"lc6.json was made for a model with 6 decoder layers \(tiny/six\), but "
                                         r".*model\d* has 12"):
        run(lc=lc_file(6, "tiny/six", "lc6.json"), n=3)
    other = lc_file(12, "someone/other-model", "other.json")
    with pytest.raises(ValueError, match=r"other.json was made for someone/other-model, not .*model\d*; .* "
                                         r"--allow-other-model"):
        run(lc=other, n=3)
    with pytest.raises(Loaded):
        run(lc=other, n=3, allow_other_model=True)
    with pytest.raises(Loaded):  # the same model under another path (hub id vs local download)
        run(lc=lc_file(12, f"owner/{model_folder.name}", "same.json"), n=3)
    with pytest.raises(ValueError, match=r"n must be in 0..12"):
        run(lc=lc_file(12, None, "no_id.json"), n=13)

    deep = ShortVConfig([3, 14]).save(tmp_path / "deep.json")
    with pytest.raises(ValueError, match=r"deep.json: layer\(s\) \[14\] do not exist in .*model\d* \(12 decoder layers"):
        run(config=deep)
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ValueError, match=r"empty.json: not a ShortV config: a ShortV config needs \"layers\""):
        run(config=tmp_path / "empty.json")
    with pytest.raises(ValueError, match=r"--n goes with --lc .*; --config FILE already lists its layers"):
        run(config=deep, n=3)
    assert [path.name for path in (tmp_path / "out").iterdir() if path.name != ".shortv.lock"] == []  # no result


def test_over_long_input_is_named_before_generating(tiny, test_samples, tmp_path, monkeypatch):
    import shortv.evaluation as evaluation

    model, processor = tiny
    long = VQASample(id="long", images=test_samples[0].images, prompt=" ".join(["what color is the circle"] * 100),
                     answer="red", source="data.jsonl:9")
    monkeypatch.setattr(evaluation, "generate_answers", lambda *a, **k: pytest.fail("generated anyway"))
    with pytest.raises(ValueError, match=r"data.jsonl:9: the input is \d+ tokens \+ 8 new tokens, longer than the "
                                         r"model's context of 512 tokens"):
        evaluate(model, processor, [*test_samples[:2], long], ShortVConfig([1]), out_dir=tmp_path, progress=False)
    remove_shortv(model)
    assert not (tmp_path / "predictions.jsonl").exists()
