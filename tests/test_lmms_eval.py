"""The lmms-eval model (``--model shortv``) against lmms-eval's real model interface, on the untrained tiny LLaVA."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch

pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402
from PIL import Image  # noqa: E402

from shortv import ShortVConfig, disable_shortv, get_shortv_state  # noqa: E402
from shortv.integrations import lmms_eval_manifests  # noqa: E402
from shortv.integrations.lmms_eval import (  # noqa: E402
    GenerationSettings,
    ShortV,
    ShortVChat,
    resolve_shortv_config,
    truncate_at_stops,
)
from shortv.tiny import build, synthetic  # noqa: E402

TASK, SPLIT = "tiny_vqa", "test"
LAYERS = [1, 3, 5, 7]
GREEDY = {"max_new_tokens": 6, "temperature": 0, "do_sample": False}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llava")
    # Untrained, with Llama's usual init: it babbles several words before </s>, which the stop-string tests need.
    build.build_model(seed=0, text_init_std=0.02).save_pretrained(folder)
    build.build_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    rows = synthetic.read_split(synthetic.write_split("calib", tmp_path_factory.mktemp("data"), n=3))
    docs = []
    for row in rows:
        with Image.open(row["image"]) as image:
            docs.append({"image": image.convert("RGB"), "question": row["prompt"]})
    # Prompts of different lengths, so the longest-first batching really reorders the requests.
    docs[2]["question"] = "please answer with a single word . " + docs[2]["question"]
    return docs


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    return ShortVConfig(layers=LAYERS).save(tmp_path_factory.mktemp("cfg") / "shortv_config.json")


def make_model(cls, model_path, docs, args="", batch_size=1):
    lm = cls.create_from_arg_string(f"pretrained={model_path}{',' + args if args else ''}",
                                    {"batch_size": batch_size, "device": "cpu"})
    lm.task_dict = {TASK: {SPLIT: docs}}  # what lmms-eval's evaluator sets before calling the model
    return lm


def simple_requests(docs, gen_kwargs=GREEDY):
    return [
        Instance(
            request_type="generate_until",
            arguments=(doc["question"], dict(gen_kwargs), lambda d: [d["image"]], doc_id, TASK, SPLIT),
            idx=0,
            metadata={"task": TASK, "doc_id": doc_id, "repeats": 1},
        )
        for doc_id, doc in enumerate(docs)
    ]


def chat_requests(docs, gen_kwargs=GREEDY):
    def doc_to_messages(doc):  # the shape of lmms-eval's automatic doc_to_messages
        return [{"role": "user", "content": [{"type": "image", "url": doc["image"]},
                                             {"type": "text", "text": doc["question"]}]}]

    return [
        Instance(
            request_type="generate_until",
            arguments=(doc["question"], doc_to_messages, dict(gen_kwargs), doc_id, TASK, SPLIT),
            idx=0,
            metadata={"task": TASK, "doc_id": doc_id, "repeats": 1},
        )
        for doc_id, doc in enumerate(docs)
    ]


@pytest.fixture(scope="module")
def shortv_lm(model_path, docs, config_file):
    return make_model(ShortV, model_path, docs, f"shortv_config={config_file}")


@pytest.fixture(scope="module")
def shortv_answers(shortv_lm, docs):
    """Each request generated alone (batch of one): the ground truth for order and batching."""
    shortv_lm._batch_size = 1
    return [shortv_lm.generate_until([request])[0] for request in simple_requests(docs)]


def test_registered_with_lmms_eval():
    import lmms_eval.models

    assert any(ep.value == "shortv.integrations:lmms_eval_manifests" for ep in entry_points(group="lmms_eval.models"))
    assert lmms_eval.models.get_model("shortv") is ShortVChat
    assert lmms_eval.models.get_model("shortv", force_simple=True) is ShortV
    [manifest] = lmms_eval_manifests()
    assert manifest.model_id == "shortv"
    assert issubclass(ShortV, lmms) and ShortV.is_simple and not ShortVChat.is_simple


def test_shortv_is_applied(shortv_lm, docs):
    model = shortv_lm.model
    state = get_shortv_state(model)
    assert state is not None and state.config.layers == LAYERS and state.config.mode == "fast"
    assert shortv_lm.shortv_layers == LAYERS
    # The frozen layers really change the computation.
    messages, visuals = shortv_lm._messages(simple_requests(docs)[0])
    inputs = shortv_lm.processor(images=visuals.images, text=[shortv_lm._render(messages)], return_tensors="pt")
    with torch.no_grad():
        frozen = model(**inputs).logits
        with disable_shortv(model):
            plain = model(**inputs).logits
    assert not torch.allclose(frozen, plain)


def test_batched_answers_in_request_order(shortv_lm, docs, shortv_answers):
    assert all(isinstance(answer, str) for answer in shortv_answers)
    shortv_lm._batch_size = 2
    try:
        batched = shortv_lm.generate_until(simple_requests(docs))
        reversed_order = shortv_lm.generate_until(simple_requests(docs)[::-1])
    finally:
        shortv_lm._batch_size = 1
    assert batched == shortv_answers
    assert reversed_order == shortv_answers[::-1]


def test_until_truncates(shortv_lm, docs, shortv_answers):
    words = shortv_answers[0].split()
    assert len(words) >= 2, shortv_answers[0]
    stop = words[1]
    expected = shortv_answers[0][: shortv_answers[0].index(stop)].strip()
    stopped = simple_requests(docs, {**GREEDY, "until": [stop, "never-generated"]})
    # Mixed generation settings in one call: each request keeps its own, answers stay in order.
    requests = [stopped[0], simple_requests(docs)[1], stopped[0]]
    shortv_lm._batch_size = 2
    try:
        answers = shortv_lm.generate_until(requests)
    finally:
        shortv_lm._batch_size = 1
    assert answers == [expected, shortv_answers[1], expected]
    # A stop string that never appears changes nothing.
    assert shortv_lm.generate_until(simple_requests(docs[:1], {**GREEDY, "until": "zzz"})) == shortv_answers[:1]


def test_n0_config_equals_unpatched_baseline(model_path, docs, tmp_path):
    empty = ShortVConfig(layers=[]).save(tmp_path / "empty.json")
    n0 = make_model(ShortV, model_path, docs, "n=0", batch_size=2)
    from_file = make_model(ShortV, model_path, docs, f"shortv_config={empty}", batch_size=2)
    baseline = make_model(ShortV, model_path, docs, batch_size=2)
    assert get_shortv_state(baseline.model) is None and baseline.shortv_config is None
    assert get_shortv_state(n0.model).config.layers == [] and from_file.shortv_layers == []
    expected = baseline.generate_until(simple_requests(docs))
    assert n0.generate_until(simple_requests(docs)) == expected
    assert from_file.generate_until(simple_requests(docs)) == expected


def test_chat_variant_matches_simple(model_path, docs, config_file, shortv_answers):
    chat = make_model(ShortVChat, model_path, docs, f"shortv_config={config_file}", batch_size=2)
    assert chat.shortv_layers == LAYERS
    assert chat.generate_until(chat_requests(docs)) == shortv_answers


def test_reference_mode_and_sampling_run(model_path, docs, config_file):
    lm = make_model(ShortV, model_path, docs, f"shortv_config={config_file},shortv_mode=reference", batch_size=2)
    assert get_shortv_state(lm.model).config.mode == "reference" and lm.shortv_layers == LAYERS
    sampled = lm.generate_until(simple_requests(docs, {"max_new_tokens": 2, "temperature": 0.7, "top_p": 0.9}))
    assert len(sampled) == len(docs) and all(isinstance(answer, str) for answer in sampled)


def test_argument_errors_come_before_loading(tmp_path):
    """Through lmms-eval's way of building a model, every error is a `ModelLoadError` (exit status 1, since
    lmms-eval exits 0 on an Exception) carrying the cause; the class itself raises the cause."""
    from shortv.integrations.lmms_eval import ModelLoadError

    for args, kind, message in (("pretrained=/nonexistent,shortv_cfg=x.json", TypeError, "shortv_cfg"),
                                ("pretrained=/nonexistent,n=3", ValueError, "lc="),
                                ("pretrained=/nonexistent,n=3,shortv_config=x.json", ValueError, "not both"),
                                ("pretrained=/nonexistent,n=0,shortv_mode=turbo", ValueError, "shortv_mode")):
        with pytest.raises(ModelLoadError, match=message) as error:
            ShortV.create_from_arg_string(args)
        assert isinstance(error.value.__cause__, kind) and isinstance(error.value, SystemExit)
        assert str(error.value.code).startswith("shortv: the lmms-eval model was not built: ")
    with pytest.raises(TypeError, match="shortv_cfg"):
        ShortV(pretrained="/nonexistent", shortv_cfg="x.json")


def test_config_resolution_and_generation_settings():
    preset = resolve_shortv_config("llava-hf/llava-1.5-7b-hf", n=19)
    assert preset.layers == list(ShortVConfig.from_preset("llava-1.5-7b", n=19).layers)
    assert resolve_shortv_config("x/y") is None
    assert resolve_shortv_config("x/y", preset="llava-1.5-7b", shortv_mode="reference").mode == "reference"
    settings, ignored = GenerationSettings.from_kwargs({"until": "\n", "temperature": 0, "top_p": 0.5, "foo": 1})
    assert settings.until == ("\n",) and not settings.do_sample and settings.top_p is None and ignored == ["foo"]
    assert GenerationSettings.from_kwargs({"temperature": 0.2})[0].do_sample
    assert truncate_at_stops("a b. c\nd", ["\n", "."]) == "a b"


def test_lc_of_another_model_is_refused_and_16_bit_task_images_are_scaled(model_path, tmp_path):
    import numpy as np

    from shortv import LCResult
    from shortv.integrations.lmms_eval import _as_visuals

    lc = LCResult(num_layers=6, token_types=("visual",), sample_ids=["a"],
                  per_sample={"visual": [[0.1 * layer for layer in range(6)]]}, model_id="tiny/six").save(tmp_path / "lc6.json")
    with pytest.raises(ValueError, match=r"lc6.json was made for a model with 6 decoder layers \(tiny/six\), but "):
        ShortV(pretrained=str(model_path), n=2, lc=str(lc))
    gradient = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
    [image] = _as_visuals([Image.fromarray(gradient)]).images
    assert image.mode == "RGB" and len(np.unique(np.asarray(image))) == 256  # not clipped to white
