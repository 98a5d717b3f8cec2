import json

import pytest
import torch
from lc_oracle import naive_sample_contribution
from tiny_models import FAMILIES, TEXT_ONLY_FAMILIES, build_inputs, build_model, reset_state

from shortv.contribution import CalibrationSample, LCResult, layer_contribution, sample_contribution

LAYOUTS = [
    dict(n_text_before=3, images=1, n_text_after=5),
    dict(n_text_before=2, images=2, n_text_between=3, n_text_after=4),
]


def calibration_samples(model, family, count=2, seed=0):
    samples = []
    for index in range(count):
        layout = dict(LAYOUTS[index % len(LAYOUTS)])
        if family in TEXT_ONLY_FAMILIES:
            layout["images"] = 1
        inputs = build_inputs(model, family, batch_layouts=[layout], seed=seed + index)
        mask = inputs.visual_mask if family in TEXT_ONLY_FAMILIES else None
        samples.append(CalibrationSample(id=f"{family}-{index}", inputs=dict(inputs), visual_mask=mask))
    return samples


def ground_truth_mask(sample, model):
    if sample.visual_mask is not None:
        return sample.visual_mask
    ids = torch.tensor([model.config.image_token_id] + ([getattr(model.config, "video_token_id")]
                                                       if hasattr(model.config, "video_token_id") else []))
    return torch.isin(sample.inputs["input_ids"], ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_efficient_lc_matches_naive_oracle(family):
    model = build_model(family, init_std=0.2)
    for sample in calibration_samples(model, family):
        reset_state(model)
        efficient, evaluations = sample_contribution(model, sample)
        reset_state(model)
        naive, naive_evaluations = naive_sample_contribution(model, sample, ground_truth_mask(sample, model))
        for token_type in ("visual", "text"):
            torch.testing.assert_close(
                torch.tensor(efficient[token_type]), torch.tensor(naive[token_type]), rtol=1e-5, atol=1e-6
            )
        assert evaluations < naive_evaluations
        # Last layer: nothing downstream reads the visual states, so its visual LC is zero; its text LC is not.
        assert efficient["visual"][-1] == 0.0
        assert efficient["text"][-1] > 1e-6
        assert max(efficient["visual"]) > 1e-6


@pytest.mark.parametrize("divergence", ["kl_reversed", "js"])
def test_other_divergences_and_answer_positions_match_oracle(divergence):
    model = build_model("llava", init_std=0.2)
    sample = calibration_samples(model, "llava", count=1)[0]
    seq = sample.inputs["input_ids"].shape[1]
    sample.target_positions = (seq - 4, seq - 3, seq - 2)  # e.g. teacher-forced answer tokens
    efficient, _ = sample_contribution(model, sample, divergence=divergence)
    naive, _ = naive_sample_contribution(model, sample, ground_truth_mask(sample, model), divergence=divergence)
    for token_type in ("visual", "text"):
        torch.testing.assert_close(torch.tensor(efficient[token_type]), torch.tensor(naive[token_type]),
                                   rtol=1e-5, atol=1e-6)


def test_mean_order_and_json_round_trip(tmp_path):
    model = build_model("llava", init_std=0.2)
    samples = calibration_samples(model, "llava", count=3)
    result = layer_contribution(model, samples, model_id="tiny-llava", progress=False)
    per_sample = [sample_contribution(model, sample)[0] for sample in samples]
    for token_type in ("visual", "text"):
        expected = [sum(lc[token_type][layer] for lc in per_sample) / 3 for layer in range(4)]
        torch.testing.assert_close(torch.tensor(result.mean[token_type]), torch.tensor(expected), rtol=1e-12, atol=0)
    visual = result.mean["visual"]
    assert result.order == sorted(range(4), key=lambda layer: visual[layer])
    assert result.order[0] == 3  # the last layer's visual LC is exactly 0
    loaded = LCResult.load(result.save(tmp_path / "lc.json"))
    assert loaded.per_sample == result.per_sample and loaded.order == result.order
    assert json.loads((tmp_path / "lc.json").read_text())["order"] == result.order
    # Deterministic: a second run gives identical numbers.
    assert layer_contribution(model, samples, progress=False).per_sample == result.per_sample


def test_resume_after_interruption_gives_identical_result(tmp_path, monkeypatch):
    import shortv.contribution as contribution

    model = build_model("qwen2_vl", init_std=0.2)
    samples = calibration_samples(model, "qwen2_vl", count=4)
    uninterrupted = layer_contribution(model, samples, progress=False)

    real_sample_contribution = contribution.sample_contribution
    calls = []

    def interrupted_on_third_sample(*args, **kwargs):  # like Ctrl-C in the middle of a run
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_sample_contribution(*args, **kwargs)

    monkeypatch.setattr(contribution, "sample_contribution", interrupted_on_third_sample)
    with pytest.raises(KeyboardInterrupt):
        layer_contribution(model, samples, out_dir=tmp_path, progress=False)
    monkeypatch.setattr(contribution, "sample_contribution", real_sample_contribution)
    assert len((tmp_path / "lc_samples.jsonl").read_text().splitlines()) == 2
    with pytest.raises(FileExistsError, match=r"already holds results \(lc_samples.jsonl\); .*rerun with --resume"):
        layer_contribution(model, samples, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"cannot resume .*: the interrupted run had other settings \(divergence: .kl. before, .js. now\)"):
        layer_contribution(model, samples, out_dir=tmp_path, resume=True, divergence="js", progress=False)
    resumed = layer_contribution(model, samples, out_dir=tmp_path, resume=True, progress=False)
    assert resumed.per_sample == uninterrupted.per_sample
    assert resumed.mean == uninterrupted.mean
    assert resumed.metadata["layer_evaluations_this_run"] < uninterrupted.metadata["layer_evaluations_this_run"]


def test_errors():
    model = build_model("llava")
    sample = calibration_samples(model, "llava", count=1)[0]
    with pytest.raises(ValueError, match="token_types must be a non-empty subset"):
        layer_contribution(model, [sample], token_types=("audio",))
    with pytest.raises(ValueError, match="unknown divergence 'l2'"):
        layer_contribution(model, [sample], divergence="l2")
    with pytest.raises(ValueError, match="sample ids must be unique"):
        layer_contribution(model, [sample, sample], progress=False)
    text_only = CalibrationSample(id="t", inputs={"input_ids": torch.tensor([[5, 6, 7]])})
    with pytest.raises(ValueError, match="sample 't' has no visual token"):
        layer_contribution(model, [text_only], progress=False)


def test_half_precision_model_scores_in_fp32():
    model = build_model("llava", init_std=0.2).to(torch.bfloat16)
    sample = calibration_samples(model, "llava", count=1)[0]
    lc, _ = sample_contribution(model, sample)
    reference = build_model("llava", init_std=0.2)
    lc32, _ = sample_contribution(reference, sample)
    assert lc["visual"][-1] == 0.0 and all(value >= 0 and value == value for value in lc["visual"] + lc["text"])
    # bf16 weights move the numbers, not the picture: the layer ranking by text LC agrees with fp32.
    assert sorted(range(4), key=lc["text"].__getitem__) == sorted(range(4), key=lc32["text"].__getitem__)


def test_non_finite_lc_names_the_sample_and_stops_before_recording_it(tmp_path):
    model = build_model("llava", init_std=0.2)
    samples = calibration_samples(model, "llava", count=3)
    samples[1].inputs["pixel_values"] = torch.full_like(samples[1].inputs["pixel_values"], float("nan"))
    with pytest.raises(ValueError, match=r"sample 'llava-1': Layer Contribution is not finite \(visual LC of layer"):
        layer_contribution(model, samples, out_dir=tmp_path, progress=False)
    lines = (tmp_path / "lc_samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["llava-0"]  # the good sample is kept, no NaN written
    assert "NaN" not in (tmp_path / "lc_samples.jsonl").read_text()


def test_non_finite_lc_is_never_saved_loaded_or_ranked(tmp_path):
    with pytest.raises(ValueError, match=r"sample 'b': visual LC is not finite"):
        LCResult(num_layers=2, token_types=("visual",), sample_ids=["a", "b"],
                 per_sample={"visual": [[0.1, 0.2], [float("nan"), 0.2]]})
    path = tmp_path / "lc.json"
    good = LCResult(num_layers=2, token_types=("visual",), sample_ids=["a"], per_sample={"visual": [[0.1, 0.2]]})
    path.write_text(json.dumps(good.to_dict()).replace("0.2", "NaN"))  # e.g. written by an older version
    with pytest.raises(ValueError, match=r"lc.json: not an LC file from shortv calibrate: sample 'a': visual LC"):
        LCResult.load(path)


def test_rounding_never_gives_a_negative_lc():
    from shortv.contribution import divergence_between

    torch.manual_seed(0)
    logits = torch.randn(64, 32000) * 3
    original = torch.log_softmax(logits, dim=-1)
    variant = torch.log_softmax(logits + 1e-6 * torch.randn_like(logits), dim=-1)
    unclamped = (variant.exp() * (variant - original)).sum(-1)
    assert (unclamped < 0).any()  # fp32 rounding: the formula alone gives about -3e-7 on some rows
    for kind in ("kl", "kl_reversed", "js"):
        assert (divergence_between(variant, original, kind) >= 0).all()


def test_ties_in_the_order_go_to_the_lower_layer():
    lc = LCResult(num_layers=5, token_types=("visual",), sample_ids=["a", "b"],
                  per_sample={"visual": [[0.2, 0.0, 0.1, 0.0, 0.1], [0.2, 0.0, 0.1, 0.0, 0.1]]})
    assert lc.order == [1, 3, 2, 4, 0]
