"""The rest of lmms-eval's model interface on the untrained tiny LLaVA: ``loglikelihood`` (against a per-request
oracle: the model's own forward over context + continuation with ShortV in reference mode) and
``generate_until_multi_round`` (against single-round generation of each round's prompt)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance, unwrap_generation_output  # noqa: E402

from shortv import ShortVConfig, apply_shortv, remove_shortv  # noqa: E402
from shortv.integrations.lmms_eval import ShortV, ShortVChat  # noqa: E402

from test_lmms_eval import SPLIT, TASK, docs, make_model, model_path  # noqa: E402,F401  (the same model, docs)

LAYERS = [1, 3, 5, 7]
CHOICES = ["red", "blue", "circle square", "yes"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def round_docs(docs):
    """The docs, each with its number of rounds for the multi-round task (1, 2 and 3)."""
    return [dict(doc, rounds=index + 1) for index, doc in enumerate(docs)]


def doc_to_visual(doc):
    return [doc["image"]]


def loglikelihood_requests(docs, greedy_word):
    requests = []
    for doc_id, doc in enumerate(docs):
        choices = CHOICES + ([greedy_word] if doc_id == 0 else [])
        for choice in choices:
            requests.append(Instance(request_type="loglikelihood", idx=0,
                                     metadata={"task": TASK, "doc_id": doc_id, "repeats": 1},
                                     arguments=(doc["question"], f" {choice}", doc_to_visual, doc_id, TASK, SPLIT)))
    # A loglikelihood task's doc_to_target (a callable), and an unconditional request (acc_mutual_info): no image.
    requests.append(Instance(request_type="loglikelihood", idx=0, metadata={"task": TASK, "doc_id": 1, "repeats": 1},
                             arguments=(docs[1]["question"], lambda doc: " blue", doc_to_visual, 1, TASK, SPLIT)))
    requests.append(Instance(request_type="loglikelihood", idx=0, metadata={"task": TASK, "doc_id": 0, "repeats": 1},
                             arguments=("", " red")))
    return requests


def scores(lm, requests):
    """``lm.loglikelihood(requests)`` as lmms-eval's evaluator reads it: (loss, is_greedy) pairs."""
    pairs = [unwrap_generation_output(result)[0] for result in lm.loglikelihood(requests)]
    assert all(isinstance(loss, float) and isinstance(greedy, bool) for loss, greedy in pairs), pairs
    return pairs


def oracle(model, processor, docs, request):
    """Mean loss and greedy flag of one request, from the model's forward over prompt + continuation (batch of one;
    the prompt's length from the processor's own expansion of the prompt alone)."""
    args = request.args
    if len(args) == 2:
        context, continuation, images = args[0], args[1], []
    else:
        context, target, _, doc_id, _, _ = args
        continuation = target(docs[doc_id]) if callable(target) else target
        images = [docs[doc_id]["image"]]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": context}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=False)
    images = images or None
    prompt_length = processor(images=images, text=prompt, return_tensors="pt")["input_ids"].shape[1]
    inputs = processor(images=images, text=prompt + continuation, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    log_probs = logits[prompt_length - 1 : -1].log_softmax(-1)
    targets = inputs["input_ids"][0, prompt_length:]
    return float(-log_probs.gather(-1, targets[:, None]).mean()), bool((log_probs.argmax(-1) == targets).all())


@pytest.fixture(scope="module")
def reference_model(model_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_path).eval()
    return model, AutoProcessor.from_pretrained(model_path)


@pytest.fixture(scope="module")
def greedy_word(reference_model, docs):
    """The word the ShortV model puts first after doc 0's prompt: a continuation that is greedy."""
    model, processor = reference_model
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": docs[0]["question"]}]}],
        add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[docs[0]["image"]], text=prompt, return_tensors="pt")
    apply_shortv(model, ShortVConfig(LAYERS, mode="reference"))
    try:
        with torch.no_grad():
            token = int(model(**inputs).logits[0, -1].argmax())
    finally:
        remove_shortv(model)
    word = processor.tokenizer.decode([token]).strip()
    assert word and processor.tokenizer(f" {word}", add_special_tokens=False)["input_ids"] == [token]
    return word


def test_loglikelihood_matches_the_reference_oracle_at_batch_sizes_1_and_8(model_path, docs, reference_model,
                                                                            greedy_word, tmp_path):
    requests = loglikelihood_requests(docs, greedy_word)
    lm = make_model(ShortV, model_path, docs, f"shortv_config={ShortVConfig(LAYERS).save(tmp_path / 'c.json')}")
    assert lm.shortv_layers == LAYERS and lm.shortv_config.mode == "fast"
    alone = scores(lm, requests)
    lm._batch_size = 8
    batched = scores(lm, requests)
    assert [greedy for _, greedy in alone] == [greedy for _, greedy in batched]
    torch.testing.assert_close(torch.tensor([v for v, _ in batched]), torch.tensor([v for v, _ in alone]),
                               rtol=0, atol=1e-5)

    model, processor = reference_model
    apply_shortv(model, ShortVConfig(LAYERS, mode="reference"))
    try:
        expected = [oracle(model, processor, docs, request) for request in requests]
    finally:
        remove_shortv(model)
    plain = [oracle(model, processor, docs, request) for request in requests]
    assert [greedy for _, greedy in alone] == [greedy for _, greedy in expected]
    torch.testing.assert_close(torch.tensor([v for v, _ in alone]), torch.tensor([v for v, _ in expected]),
                               rtol=0, atol=1e-5)
    # Not trivial: the frozen layers change the scores of the requests with an image (not the text-only one),
    # some continuations are greedy and some are not, and the scores differ between choices.
    differences = [abs(a - b) for (a, _), (b, _) in zip(expected, plain)]
    assert min(differences[:-1]) > 1e-4 and differences[-1] < 1e-6, differences
    assert alone[len(CHOICES)][1] and not all(greedy for _, greedy in alone[: len(CHOICES)])  # doc 0's greedy word
    assert len({round(v, 4) for v, _ in alone[: len(CHOICES)]}) == len(CHOICES)


def test_loglikelihood_through_the_chat_class_and_errors(model_path, docs, greedy_word):
    requests = loglikelihood_requests(docs, greedy_word)[:3]
    simple = make_model(ShortV, model_path, docs, "n=0", batch_size=2)
    chat = make_model(ShortVChat, model_path, docs, "n=0", batch_size=2)
    assert scores(chat, requests) == scores(simple, requests)
    empty = Instance(request_type="loglikelihood", idx=0, metadata={"task": TASK, "doc_id": 0, "repeats": 1},
                     arguments=(docs[0]["question"], "", doc_to_visual, 0, TASK, SPLIT))
    with pytest.raises(ValueError, match="adds no token to its prompt"):
        simple.loglikelihood([empty])


# --------------------------------------------------------------------------- multi-round


def round_context(doc, round_idx, previous_output):
    return f"{doc['question']} round {round_idx} : {previous_output[-1]}"


def make_doc_to_text(calls):
    """A multi-round task's doc_to_text (lmms-eval's protocol): doc ``rounds`` rounds; later rounds quote the
    previous answer. Records what it was given."""

    def doc_to_text(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None,
                    previous_round_info=None):
        if round_idx is None:
            return doc["question"]
        calls.append((doc["question"], round_idx, list(previous_output), previous_round_info))
        if round_idx == doc["rounds"]:
            return None, None, True, previous_output, None
        return [doc["image"]], round_context(doc, round_idx, previous_output), False, previous_output, {"r": round_idx}

    return doc_to_text


def multi_round_requests(docs, doc_to_text, gen_kwargs):
    return [Instance(request_type="generate_until_multi_round", idx=0,
                     metadata={"task": TASK, "doc_id": doc_id, "repeats": 1},
                     arguments=(doc["question"], dict(gen_kwargs), doc_to_visual, doc_to_text, doc_id, TASK, SPLIT))
            for doc_id, doc in enumerate(docs)]


def chat_multi_round_requests(docs, gen_kwargs):
    def doc_to_messages(doc, round_idx=None, previous_output=None, previous_round_info=None):
        if round_idx is None:
            text = doc["question"]
        elif round_idx == doc["rounds"]:
            return None, True, previous_output, previous_round_info
        else:
            text = round_context(doc, round_idx, previous_output)
        content = [{"type": "image", "url": doc["image"]}, {"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        return messages if round_idx is None else (messages, False, previous_output, None)

    return [Instance(request_type="generate_until_multi_round", idx=0,
                     metadata={"task": TASK, "doc_id": doc_id, "repeats": 1},
                     arguments=(doc["question"], doc_to_messages, dict(gen_kwargs), doc_id, TASK, SPLIT))
            for doc_id, doc in enumerate(docs)]


def test_multi_round_answers_every_round_like_single_rounds(model_path, round_docs, tmp_path):
    docs = round_docs
    config = ShortVConfig(LAYERS).save(tmp_path / "c.json")
    gen_kwargs = {"max_new_tokens": 3, "temperature": 0}
    lm = make_model(ShortV, model_path, docs, f"shortv_config={config}", batch_size=3)
    calls = []
    answers = lm.generate_until_multi_round(multi_round_requests(docs, make_doc_to_text(calls), gen_kwargs))
    assert [len(rounds) for rounds in answers] == [doc["rounds"] for doc in docs]  # 1, 2 and 3 rounds

    # Each round's answer is what generate_until answers to that round's prompt alone.
    lm._batch_size = 1
    for doc_id, (doc, rounds) in enumerate(zip(docs, answers)):
        contexts = [doc["question"]] + [round_context(doc, r, rounds[:r]) for r in range(1, doc["rounds"])]
        single = [Instance(request_type="generate_until", idx=0,
                           metadata={"task": TASK, "doc_id": doc_id, "repeats": 1},
                           arguments=(context, dict(gen_kwargs), doc_to_visual, doc_id, TASK, SPLIT))
                  for context in contexts]
        assert [lm.generate_until([request])[0] for request in single] == rounds
        # The task saw every earlier answer and its own round info.
        mine = [call for call in calls if call[0] == doc["question"]]
        assert [call[1] for call in mine] == list(range(1, doc["rounds"] + 1))
        assert [call[2] for call in mine] == [rounds[:r] for r in range(1, doc["rounds"] + 1)]
        assert [call[3] for call in mine] == [None] + [{"r": r} for r in range(1, doc["rounds"])]

    chat = make_model(ShortVChat, model_path, docs, f"shortv_config={config}", batch_size=2)
    assert chat.generate_until_multi_round(chat_multi_round_requests(docs, gen_kwargs)) == answers

    broken = multi_round_requests(docs[1:2], lambda doc, **kwargs: "just a string", gen_kwargs)
    with pytest.raises(ValueError, match=r"doc_to_text must return \(visuals, context, terminal"):
        lm.generate_until_multi_round(broken)


def pruned_oracle(model, processor, docs, request):
    """`oracle` under FastV/VTW: the forward returns the kept positions only; `kept_columns` says which."""
    from shortv.pruning import kept_columns

    _, continuation, _, doc_id, _, _ = request.args
    content = [{"type": "image"}, {"type": "text", "text": request.args[0]}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=False)
    images = [docs[doc_id]["image"]]
    prompt_length = processor(images=images, text=prompt, return_tensors="pt")["input_ids"].shape[1]
    inputs = processor(images=images, text=prompt + continuation, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    row = {int(column): index for index, column in enumerate(kept_columns(model)[0])}
    width = inputs["input_ids"].shape[1]
    log_probs = logits[[row[column] for column in range(prompt_length - 1, width - 1)]].log_softmax(-1)
    targets = inputs["input_ids"][0, prompt_length:]
    return float(-log_probs.gather(-1, targets[:, None]).mean()), bool((log_probs.argmax(-1) == targets).all())


def test_token_pruning_methods_through_model_args(model_path, docs, reference_model, tmp_path):
    """``method=shortv+fastv,k=..,ratio=..`` with a ShortV config: the method and its parameters are recorded, and
    the loglikelihood scores are the pruned model's (oracle: the pruned forward by hand, rows by `kept_columns`)."""
    from shortv.integrations.lmms_eval import ModelLoadError
    from shortv.pruning import TokenPruningConfig, apply_token_pruning, remove_token_pruning

    config = ShortVConfig(LAYERS).save(tmp_path / "c.json")
    lm = make_model(ShortV, model_path, docs, f"shortv_config={config},method=shortv+fastv,k=2,ratio=0.75")
    assert lm.method_record == {"method": "shortv+fastv", "layers": LAYERS, "k": 2, "ratio": 0.75, "rank": "last"}
    assert lm.shortv_layers == LAYERS
    requests = [request for request in loglikelihood_requests(docs, "red") if len(request.args) == 6][:4]
    lm._batch_size = 4
    got = scores(lm, requests)
    model, processor = reference_model
    apply_token_pruning(model, TokenPruningConfig("fastv", k=2, ratio=0.75, shortv_layers=LAYERS))
    try:
        expected = [pruned_oracle(model, processor, docs, request) for request in requests]
    finally:
        remove_token_pruning(model)
    plain = [oracle(model, processor, docs, request) for request in requests]
    torch.testing.assert_close(torch.tensor([v for v, _ in got]), torch.tensor([v for v, _ in expected]),
                               rtol=0, atol=1e-5)
    assert min(abs(a - b) for (a, _), (b, _) in zip(expected, plain)) > 1e-4  # pruning changes the scores
    vtw = TokenPruningConfig("vtw", k=3).save(tmp_path / "vtw.json")  # a token pruning config file
    assert make_model(ShortV, model_path, docs, f"shortv_config={vtw}").method_record == {"method": "vtw", "k": 3}
    for args, message in ((f"shortv_config={config},method=fastv", "method=fastv takes no ShortV layers"),
                          ("method=vtw", "needs K"), ("k=2", "give --method"),
                          ("method=fastv,ratio=1.0", r"must be in \[0, 1\)"),
                          ("method=fastv,k=12", r"must be in 1..11 for a model of 12 decoder layers")):
        with pytest.raises(ModelLoadError, match=message):
            make_model(ShortV, model_path, docs, args)
