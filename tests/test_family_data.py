"""The data path of every new family through its own processor class and chat template (built offline in
tests/tiny_processors.py): evaluation, LC calibration and the lmms-eval model, with one and two images per sample.
"""

import importlib.util
import json

import pytest
import torch
from lc_oracle import naive_sample_contribution
from tiny_models import build_model
from tiny_processors import build_processor

from shortv import ShortVConfig, apply_shortv, disable_shortv, remove_shortv
from shortv.contribution import layer_contribution, sample_contribution
from shortv.data import CalibrationSamples, read_jsonl
from shortv.evaluation import batch_inputs, evaluate, token_counts
from shortv.loading import inputs_for
from shortv.registry import visual_token_ids
from shortv.tiny import synthetic


def _needs(module: str, reason: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=reason)


FAMILIES = ["qwen3_vl", "qwen3_vl_moe", "internvl_qwen3", "idefics3", "gemma3", "glm4v", "qwen3_5", "qwen3_5_moe",
            "gemma4",
            pytest.param("smolvlm", marks=_needs("num2words", "transformers' SmolVLMProcessor needs num2words")),
            pytest.param("mistral3", marks=_needs("torchvision", "transformers' PixtralProcessor needs torchvision"))]
LAYERS = [1, 2]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vqa")
    path = synthetic.write_split("test", folder, n=4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    # A two-image sample (multiple images per prompt), written into the same file.
    rows.insert(1, dict(rows[0], id="two-images", image=[rows[0]["image"], rows[1]["image"]]))
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return read_jsonl(path, require_answer=True)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    torch.manual_seed(0)
    return request.param, build_model(request.param, init_std=0.2), build_processor(request.param)


def test_batches_count_visual_tokens_and_fast_equals_reference(family, samples):
    name, model, processor = family
    batch = batch_inputs(processor, samples[:3])  # one image, two images, one image: different lengths
    ids = batch["input_ids"]
    visual = torch.isin(ids, torch.tensor(visual_token_ids(model)))
    counts = token_counts(processor, batch, visual_token_ids(model))
    assert [c["visual_tokens"] for c in counts] == visual.sum(1).tolist()
    assert counts[1]["visual_tokens"] > counts[0]["visual_tokens"] > 0  # both images of sample 1 are in
    assert [c["visual_tokens"] + c["text_tokens"] for c in counts] == batch["attention_mask"].sum(1).tolist()

    inputs = inputs_for(model, batch)

    def generate():
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=4, do_sample=False)

    apply_shortv(model, ShortVConfig(LAYERS, mode="reference"))
    reference = generate()
    apply_shortv(model, LAYERS)
    fast = generate()
    with torch.no_grad():
        frozen_logits = model(**inputs).logits
        with disable_shortv(model):
            plain_logits = model(**inputs).logits
    remove_shortv(model)
    assert torch.equal(fast, reference), name
    assert (frozen_logits - plain_logits).abs().max() > 1e-3


def test_evaluate_through_the_processor(family, samples, tmp_path):
    name, model, processor = family
    summary = evaluate(model, processor, samples, ShortVConfig(LAYERS), batch_size=2, max_new_tokens=3,
                       out_dir=tmp_path, progress=False)
    remove_shortv(model)
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert summary.num_samples == len(samples) == len(records)
    assert all(r["visual_tokens"] > 0 and r["text_tokens"] > 0 for r in records)
    two = next(r for r in records if r["id"] == "two-images")
    assert two["visual_tokens"] > records[0]["visual_tokens"]
    assert 0 < summary.flops_ratio < 1


def test_calibration_through_the_processor_matches_the_oracle(family, samples):
    name, model, processor = family
    calibration = CalibrationSamples(processor, samples[:2])
    result = layer_contribution(model, calibration, progress=False)
    assert result.num_layers == 4 and result.mean["visual"][-1] == 0.0
    sample = calibration[1]  # the two-image sample
    efficient, _ = sample_contribution(model, sample)
    mask = torch.isin(sample.inputs["input_ids"], torch.tensor(visual_token_ids(model)))
    naive, _ = naive_sample_contribution(model, sample, mask)
    for token_type in ("visual", "text"):
        torch.testing.assert_close(torch.tensor(efficient[token_type]), torch.tensor(naive[token_type]),
                                   rtol=1e-5, atol=1e-6)
    assert max(efficient["visual"]) > 1e-6


def test_lmms_eval_model_through_the_processor(family, samples, tiny_lmms_eval):
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance
    from PIL import Image

    name, model, processor = family
    lm = tiny_lmms_eval("ShortV", name, model, processor, n=0, batch_size=2, max_new_tokens=3)
    apply_shortv(model, LAYERS)
    docs = [{"images": [Image.open(path).convert("RGB") for path in sample.images], "question": sample.prompt}
            for sample in samples[:3]]
    lm.task_dict = {"t": {"test": docs}}
    requests = [Instance(request_type="generate_until", idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1},
                         arguments=(doc["question"], {"max_new_tokens": 3}, lambda d: d["images"], i, "t", "test"))
                for i, doc in enumerate(docs)]
    try:
        batched = lm.generate_until(requests)
        lm._batch_size = 1
        alone = [lm.generate_until([request])[0] for request in requests]
    finally:
        remove_shortv(model)
    assert batched == alone and all(isinstance(answer, str) for answer in batched)
