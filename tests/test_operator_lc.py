"""Per-operator Layer Contribution: efficient (one capture, batched replays) == naive (one full run per variant)."""

import json

import pytest
import torch
from lc_oracle import naive_operator_contribution, naive_sample_contribution
from test_contribution import calibration_samples, ground_truth_mask
from tiny_models import build_model, reset_state

from shortv.contribution import LCResult, layer_contribution, sample_contribution

OPERATOR_TYPES = ("visual_attention", "visual_mlp")


# llava: pre-norm; gemma3 / glm4v: sandwich norms; qwen3_5: linear attention (and full attention) layers;
# qwen3_vl_moe: MoE MLPs and DeepStack between layers; gemma4: sandwich with a parallel MoE, per-layer inputs, layer
# scalars and shared keys/values.
@pytest.mark.parametrize("family", ["llava", "gemma3", "glm4v", "qwen3_5", "qwen3_vl_moe", "gemma4"])
def test_operator_lc_matches_naive_oracle(family):
    model = build_model(family, init_std=0.2)
    sample = calibration_samples(model, family, count=1)[0]
    mask = ground_truth_mask(sample, model)
    reset_state(model)
    efficient, evaluations = sample_contribution(model, sample, token_types=("visual", *OPERATOR_TYPES))
    reset_state(model)
    naive, naive_evaluations = naive_operator_contribution(model, sample, mask)
    for token_type in OPERATOR_TYPES:
        torch.testing.assert_close(torch.tensor(efficient[token_type]), torch.tensor(naive[token_type]),
                                   rtol=1e-5, atol=1e-6)
        assert max(efficient[token_type]) > 1e-6  # non-trivial
        assert efficient[token_type][-1] == 0.0  # nothing after the last layer reads the visual rows
    # Whole-layer visual LC unchanged by asking for the operators too, and the two updates are not the same thing.
    reset_state(model)
    layer_only, _ = sample_contribution(model, sample, token_types=("visual",))
    # (batched with other variants: equal up to float rounding)
    torch.testing.assert_close(torch.tensor(efficient["visual"]), torch.tensor(layer_only["visual"]),
                               rtol=1e-5, atol=1e-6)
    assert efficient["visual_attention"] != efficient["visual_mlp"]
    assert evaluations < naive_evaluations + 2 * len(efficient["visual"]) ** 2


def test_operator_lc_counts_one_layer_pass_per_layer_and_operator():
    model = build_model("llava", init_std=0.2)
    sample = calibration_samples(model, "llava", count=1)[0]
    _, visual_only = sample_contribution(model, sample, token_types=("visual",))
    _, with_operators = sample_contribution(model, sample, token_types=("visual", *OPERATOR_TYPES))
    layers = 4
    # per operator: its own layer once, then the layers after it (the last one's shortcut counted like any row)
    assert with_operators - visual_only == 2 * sum(1 + (layers - 1 - layer) for layer in range(layers))
    _, naive = naive_sample_contribution(model, sample, ground_truth_mask(sample, model), token_types=("visual",))
    assert with_operators < 2 * naive


def test_lc_result_with_operators_round_trips_and_old_files_load(tmp_path):
    model = build_model("llava", init_std=0.2)
    samples = calibration_samples(model, "llava", count=2)
    result = layer_contribution(model, samples, token_types=("visual", "text", *OPERATOR_TYPES), progress=False)
    assert set(result.mean) == {"visual", "text", *OPERATOR_TYPES}
    loaded = LCResult.load(result.save(tmp_path / "lc.json"))
    assert loaded.per_sample == result.per_sample and loaded.token_types == result.token_types
    data = json.loads((tmp_path / "lc.json").read_text())
    for token_type in OPERATOR_TYPES:  # an LC file of an older shortv has no operator rows: it loads as before
        del data["per_sample"][token_type], data["mean"][token_type]
    data["token_types"] = ["visual", "text"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = LCResult.load(tmp_path / "old.json")
    assert old.order == result.order and "visual_mlp" not in old.per_sample
    with pytest.raises(ValueError, match="token_types must be a non-empty subset"):
        layer_contribution(model, samples, token_types=("visual_ffn",), progress=False)
