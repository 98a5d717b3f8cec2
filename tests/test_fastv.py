"""FastV and VTW on stock models (shortv.pruning) against the slow pruning oracle (tests/pruning_oracle.py): prefill
logits of every kept position and greedy ``generate`` tokens, at batch 1 and batch 2 with left padding, the rows
each layer sees and the KV cache it fills, ``remove_token_pruning`` bit-exact, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from pruning_oracle import (
    capture_decoder_calls,
    extend_inputs,
    logits_of,
    pruned_forward,
    pruned_greedy,
    rank_by_attention,
    sample_calls,
)
from tiny_models import EOS_ID, build_inputs, build_model, reset_state
from transformers import DynamicCache

from shortv.pruning import (
    TokenPruningConfig,
    apply_fastv,
    apply_token_pruning,
    apply_vtw,
    kept_columns,
    remove_token_pruning,
)

pytestmark = pytest.mark.usefixtures("one_thread")

#: Llama-like LLaVA (1-D RoPE) and Qwen2-VL (M-RoPE, positions from the image grid); one image size per family so
#: that every sample has as many visual tokens.
FAMILIES = {"llava": (12, 12), "qwen2_vl": (16, 16)}
STEPS = 4
ATOL = 1e-4  # sdpa (the patched model) against eager (the oracle reads eager attention weights)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request):
    """(family, sdpa model to patch, eager twin with the same weights for the oracle)."""
    family = request.param
    return family, build_model(family, "sdpa", init_std=0.2), build_model(family, "eager", init_std=0.2)


def _layouts(family, padded: bool) -> list[dict]:
    size = FAMILIES[family]
    layouts = [dict(n_text_before=3, images=1, n_text_after=5, image_sizes=[size], seed=0)]
    if padded:  # a shorter second sample: three columns of left padding
        layouts.append(dict(n_text_before=2, images=1, n_text_after=3, image_sizes=[size], seed=1))
    return layouts


def _inputs(model, family, padded: bool):
    return build_inputs(model, family, batch_layouts=_layouts(family, padded), padding_side="left")


def _config(method: str, k: int = 2) -> TokenPruningConfig:
    if method == "vtw":
        return TokenPruningConfig("vtw", k=k)
    return TokenPruningConfig("fastv", k=k, ratio=0.5, rank=method.split("-")[1])


def _oracle_kept(config: TokenPruningConfig, visual: torch.Tensor):
    """The oracle's ``kept_visual`` for a batch whose samples have as many visual tokens."""
    keep = config.kept(int(visual[0].sum()))
    if keep == 0:
        return torch.zeros(len(visual), 0, dtype=torch.long)
    return lambda weights: rank_by_attention(weights, visual, keep, config.rank)


def _kept_for(config: TokenPruningConfig, visual: torch.Tensor):
    """``i`` -> the oracle's ``kept_visual`` for sample ``i`` alone."""
    return lambda i: _oracle_kept(config, visual[i : i + 1])


def _run_pruned(model, config: TokenPruningConfig, inputs, generate: bool = True, **generate_kwargs):
    """(logits, kept columns, generated tokens or None) of ``model`` under ``config``, removed afterwards."""
    apply_token_pruning(model, config)
    try:
        with torch.no_grad():
            reset_state(model)
            logits = model(**inputs).logits
        columns = kept_columns(model)
        generated = None
        if generate:
            reset_state(model)
            generated = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, min_new_tokens=STEPS,
                                       **generate_kwargs)
            generated = generated[:, inputs["input_ids"].shape[1]:]
    finally:
        remove_token_pruning(model)
    return logits, columns, generated


def _oracle_greedy(eager, inputs, config: TokenPruningConfig, frozen_layers=()) -> torch.Tensor:
    return pruned_greedy(eager, dict(inputs), inputs.visual_mask, config.k, _kept_for(config, inputs.visual_mask),
                         STEPS, reset=reset_state, frozen_layers=frozen_layers, banned=[EOS_ID])


def _mixed_inputs(model, family):
    """One image in the first sample, two in the second (different visual counts), left padding."""
    size = FAMILIES[family]
    return build_inputs(model, family, batch_layouts=[
        dict(n_text_before=3, images=1, n_text_after=5, image_sizes=[size], seed=0),
        dict(n_text_before=2, images=2, n_text_after=3, image_sizes=[size, size], seed=1)])


def _check_each_sample(eager, inputs, config: TokenPruningConfig, logits, columns, frozen_layers=(),
                       atol: float = ATOL) -> None:
    """Each sample's kept columns and real rows' logits equal the oracle run on it alone (its rows of the batch's
    calls); a sample that keeps fewer columns has padding slots (-1) first."""
    visual = inputs.visual_mask
    reset_state(eager)
    calls = capture_decoder_calls(eager, inputs)
    for i in range(len(visual)):
        oracle = pruned_forward(eager, sample_calls(calls, i), visual[i : i + 1], config.k,
                                _kept_for(config, visual)(i), frozen_layers=frozen_layers)
        n = oracle.columns.shape[1]
        assert columns[i, -n:].tolist() == oracle.columns[0].tolist()
        assert (columns[i, :-n] == -1).all()
        real = inputs["attention_mask"][i].bool()[oracle.columns[0]]
        expected = logits_of(eager, oracle.hidden_states[0])
        torch.testing.assert_close(logits[i, -n:][real], expected[real], rtol=0, atol=atol)


CASES = [("fastv-last", False), ("fastv-last", True), ("fastv-mean", False), ("vtw", False), ("vtw", True)]


@pytest.mark.parametrize(("method", "padded"), CASES)
def test_prefill_and_generate_equal_the_oracle(pair, method: str, padded: bool) -> None:
    _check_against_the_oracle(*pair, method, padded)


#: More families, each once (FastV, batch 2, left padding): LLaVA-NeXT tiles, OneVision (Qwen2), Qwen2.5-VL,
#: InternVL with Qwen3 (QK-norm), SmolVLM, Mistral 3, GLM-4.1V (sandwich norms, interleaved RoPE), Ministral 3
#: (queries scaled by position: the ranking and the kept layers read the kept tokens' original positions).
MORE_FAMILIES = {"llava_next": (16, 16), "llava_onevision": (12, 12), "qwen2_5_vl": (16, 16), "internvl_qwen3": 1,
                 "smolvlm": 1, "mistral3": (16, 16), "glm4v": (16, 16), "mistral3_ministral3": (16, 16)}


@pytest.mark.parametrize("family", sorted(MORE_FAMILIES))
def test_more_families_equal_the_oracle(family: str, monkeypatch) -> None:
    monkeypatch.setitem(FAMILIES, family, MORE_FAMILIES[family])
    model, eager = build_model(family, "sdpa", init_std=0.2), build_model(family, "eager", init_std=0.2)
    _check_against_the_oracle(family, model, eager, "fastv-last", True)


def _check_against_the_oracle(family: str, model, eager, method: str, padded: bool, k: int = 2,
                              atol: float = ATOL) -> None:
    inputs = _inputs(model, family, padded)
    visual = inputs.visual_mask
    config = _config(method, k)
    with torch.no_grad():
        reset_state(model)
        unpatched = model(**inputs).logits
    logits, columns, generated = _run_pruned(model, config, inputs)
    reset_state(eager)
    oracle = pruned_forward(eager, capture_decoder_calls(eager, inputs), visual, config.k, _oracle_kept(config, visual))
    assert torch.equal(columns, oracle.columns), (family, method)
    real = inputs["attention_mask"].bool().gather(1, columns)  # padding rows differ between sdpa and eager
    expected = logits_of(eager, oracle.hidden_states)
    torch.testing.assert_close(logits[real], expected[real], rtol=0, atol=atol)
    # Not the unpatched model: the last position's logits move once visual tokens leave.
    assert not torch.allclose(logits[:, -1], unpatched[:, -1], atol=1e-3)
    assert torch.equal(generated, _oracle_greedy(eager, inputs, config)), (family, method)
    with torch.no_grad():
        reset_state(model)
        torch.testing.assert_close(model(**inputs).logits, unpatched, rtol=0, atol=0)  # remove is bit-exact


def _rows_and_cache(model, config: TokenPruningConfig, inputs) -> tuple[list[int], object]:
    """(the rows each decoder layer sees, the KV cache) of one pruned prefill."""
    rows: dict[int, int] = {}
    layers = model.model.language_model.layers
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: rows.__setitem__(i, a[0].shape[1]))
               for i, layer in enumerate(layers)]
    apply_token_pruning(model, config)
    try:
        with torch.no_grad():
            reset_state(model)
            cache = model(**inputs, use_cache=True).past_key_values
    finally:
        remove_token_pruning(model)
        for handle in handles:
            handle.remove()
    return [rows[i] for i in range(len(layers))], cache


@pytest.mark.parametrize("method", ["fastv-last", "vtw"])
def test_rows_and_kv_cache_per_layer(pair, method: str) -> None:
    """Layers 0..K-1 see every column and cache it; layers K.. see t + kept rows and cache only those."""
    family, model, _ = pair
    inputs = _inputs(model, family, padded=True)
    visual = inputs.visual_mask
    config = _config(method)
    seq, v = visual.shape[1], int(visual[0].sum())
    layers = model.model.language_model.layers
    rows, cache = _rows_and_cache(model, config, inputs)
    kept = seq - v + config.kept(v)
    expected = [seq] * config.k + [kept] * (len(layers) - config.k)
    assert rows == expected
    assert [cache.get_seq_length(i) for i in range(len(layers))] == expected
    assert kept < seq


def test_config_round_trip_and_bad_parameters(tmp_path) -> None:
    config = TokenPruningConfig("fastv", k=3, ratio=0.75, rank="mean")
    assert TokenPruningConfig.load(config.save(tmp_path / "fastv.json")) == config
    vtw = TokenPruningConfig("vtw", k=4, provenance={"rule": "vtw_kl", "threshold": 0.1, "kl": [0.5, 0.2, 0.05]})
    assert TokenPruningConfig.load(vtw.save(tmp_path / "vtw.json")) == vtw
    assert TokenPruningConfig("vtw", k=5).ratio == 1.0
    assert TokenPruningConfig(k=2).ratio == 0.5
    for kwargs, message in [
        (dict(ratio=1.0), r"R .* must be in \[0, 1\)"),
        (dict(ratio=-0.1), r"R .* must be in \[0, 1\)"),
        (dict(k=0), "K .* must be >= 1"),
        (dict(rank="first"), "rank must be one of"),
        (dict(method="pdrop"), "method must be one of"),
        (dict(method="vtw", ratio=0.5), "VTW withdraws every visual token"),
    ]:
        with pytest.raises(ValueError, match=message):
            TokenPruningConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown token pruning config field"):
        TokenPruningConfig.from_dict({"k": 2, "layers": [1]})


def test_refusals_leave_the_model_untouched(pair) -> None:
    from shortv import apply_shortv, remove_shortv

    family, model, _ = pair
    inputs = _inputs(model, family, padded=False)
    with pytest.raises(ValueError, match=r"K \(the first pruned layer\) must be in 1\.\.3"):
        apply_fastv(model, k=4)
    apply_shortv(model, [3])
    try:
        with pytest.raises(ValueError, match="with apply_shortv's ShortV is not supported"):
            apply_vtw(model, k=2)
    finally:
        remove_shortv(model)
    assert not any("forward" in layer.__dict__ for layer in model.model.language_model.layers)

    apply_fastv(model, k=2)
    try:
        with pytest.raises(ValueError, match="with FastV/VTW applied is not supported yet"):
            apply_shortv(model, [3])
        text_config = copy.deepcopy(model.config.get_text_config())
        text_config.sliding_window, text_config.layer_types = 4, ["sliding_attention"] * 4
        with pytest.raises(ValueError, match="dynamic or static cache of full- and linear-attention layers"), \
                torch.no_grad():
            reset_state(model)
            model(**inputs, past_key_values=DynamicCache(config=text_config))
        with pytest.raises(ValueError, match="cannot compute a loss over `labels`"), torch.no_grad():
            model(**inputs, labels=inputs["input_ids"])
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        with pytest.raises(RuntimeError, match="cannot tell which positions of this forward are visual"), \
                torch.no_grad():
            model.model.language_model(inputs_embeds=embeds)
        if family == "llava":  # chunked prefill: text first, then the image after cached positions
            seq = inputs["input_ids"].shape[1]
            with torch.no_grad():
                cache = model(input_ids=inputs["input_ids"][:, :2], use_cache=True).past_key_values
                with pytest.raises(ValueError, match="prune the visual tokens of a prompt's first forward only"):
                    model(input_ids=inputs["input_ids"][:, 2:], pixel_values=inputs["pixel_values"],
                          past_key_values=cache, attention_mask=torch.ones(1, seq, dtype=torch.long))
    finally:
        remove_token_pruning(model)


def test_deepstack_before_k_is_refused() -> None:
    model = build_model("qwen3_vl", "sdpa")
    with pytest.raises(ValueError, match="DeepStack"):
        apply_fastv(model, k=2)
    assert not hasattr(model, "_shortv_pruning_state")


def test_beam_scores_are_the_oracle_likelihoods(pair) -> None:
    """Beam search reorders the KV cache between steps; each returned sequence's score (summed log-probabilities,
    ``length_penalty=0``) is its likelihood under the oracle with the prompt's kept columns."""
    family, model, eager = pair
    inputs = _inputs(model, family, padded=True)
    visual = inputs.visual_mask
    config = _config("fastv-last")
    apply_token_pruning(model, config)
    try:
        reset_state(model)
        out = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, num_beams=3,
                             num_return_sequences=2, length_penalty=0.0, output_scores=True,
                             return_dict_in_generate=True)
    finally:
        remove_token_pruning(model)
    prompt = inputs["input_ids"].shape[1]
    reset_state(eager)
    ranked = pruned_forward(eager, capture_decoder_calls(eager, inputs), visual, config.k, _oracle_kept(config, visual))
    kept_visual = ranked.columns[visual.gather(1, ranked.columns)].view(len(visual), -1)
    # Each prompt twice (its two returned sequences), then the generated tokens.
    expanded = build_inputs(eager, family, batch_layouts=[lay for lay in _layouts(family, True) for _ in range(2)])
    for step in range(STEPS):
        expanded = extend_inputs(expanded, out.sequences[:, prompt + step])
    full_visual = torch.cat([visual, visual.new_zeros(2, STEPS)], dim=1).repeat_interleave(2, dim=0)
    reset_state(eager)
    oracle = pruned_forward(eager, capture_decoder_calls(eager, expanded), full_visual, config.k,
                            kept_visual.repeat_interleave(2, dim=0))
    logits = logits_of(eager, oracle.hidden_states[:, -STEPS - 1 : -1]).log_softmax(dim=-1)
    likelihood = logits.gather(2, out.sequences[:, prompt:, None]).sum(dim=(1, 2))
    torch.testing.assert_close(out.sequences_scores, likelihood, rtol=0, atol=1e-3)


@pytest.mark.parametrize("method", ["fastv-last", "vtw"])
def test_different_visual_counts_per_sample(pair, method: str) -> None:
    """One image in the first sample, two in the second: the samples keep different numbers of columns; the one
    that keeps fewer gets padding slots, which no query sees. Each sample equals the oracle run on it alone (its
    rows of the batch's calls), in prefill and in greedy decoding."""
    family, model, eager = pair
    inputs = _mixed_inputs(model, family)
    visual = inputs.visual_mask
    assert visual[0].sum() != visual[1].sum()
    config = _config(method)
    logits, columns, generated = _run_pruned(model, config, inputs)
    _check_each_sample(eager, inputs, config, logits, columns)
    assert (columns == -1).any()
    assert torch.equal(generated, _oracle_greedy(eager, inputs, config)), (family, method)


def test_vtw_rule_chooses_the_first_layer_under_the_threshold(pair) -> None:
    """VTW's rule, against the oracle's KL(P_withdrawn || P_original) at the last position for every K."""
    from shortv.contribution import divergence_between
    from shortv.pruning import choose_vtw_layer

    family, model, eager = pair
    batches = [_inputs(model, family, padded=True), _inputs(model, family, padded=False)]
    means = []
    for k in range(1, 4):
        values = []
        for inputs in batches:
            reset_state(eager)
            with torch.no_grad():
                original = eager(**inputs).logits[:, -1].log_softmax(-1)
            reset_state(eager)
            calls = capture_decoder_calls(eager, inputs)
            out = pruned_forward(eager, calls, inputs.visual_mask, k, torch.zeros(len(original), 0, dtype=torch.long))
            with torch.no_grad():
                withdrawn = logits_of(eager, out.hidden_states[:, -1]).log_softmax(-1)
            values.append(divergence_between(withdrawn, original, "kl"))
        means.append(float(torch.cat(values).mean()))
    threshold = min(means) * 1.01
    expected = next(k for k, value in enumerate(means, start=1) if value < threshold)
    config = choose_vtw_layer(model, batches, threshold)
    assert (config.method, config.k, config.ratio) == ("vtw", expected, 1.0)
    assert config.provenance["threshold"] == threshold and config.provenance["samples"] == sum(len(inputs["input_ids"]) for inputs in batches)
    assert config.provenance["kl"] == pytest.approx(means[:expected], rel=1e-3, abs=1e-6)
    assert not hasattr(model, "_shortv_pruning_state")
    with pytest.raises(ValueError, match="no K withdraws the visual tokens with a mean KL below"):
        choose_vtw_layer(model, batches, min(means) / 2)


@pytest.mark.parametrize(("method", "side"), [("fastv-last", "right"), ("fastv-mean", "right"),
                                              ("fastv-mean", "left")])
def test_padding_side_and_ranking_queries(pair, method: str, side: str) -> None:
    """With right padding the last prompt token is not the last column: ``"last"`` ranks by each sample's last real
    token; ``"mean"`` averages over each sample's real tokens, never the padding, on either side (here a few padding
    rows would not change the choice; the parity with the real-rows oracle is what is checked)."""
    family, model, eager = pair
    inputs = build_inputs(model, family, batch_layouts=_layouts(family, padded=True), padding_side=side)
    visual = inputs.visual_mask
    config = _config(method)
    real_rows = inputs["attention_mask"].bool()
    last = inputs["attention_mask"].sum(dim=1) - 1 if side == "right" else None
    keep = config.kept(int(visual[0].sum()))
    logits, columns, _ = _run_pruned(model, config, inputs, generate=False)
    reset_state(eager)
    calls = capture_decoder_calls(eager, inputs)

    def oracle(**ranking):
        return pruned_forward(eager, calls, visual, config.k,
                              lambda weights: rank_by_attention(weights, visual, keep, config.rank, **ranking))
    expected = oracle(last=last, real=real_rows)
    assert torch.equal(columns, expected.columns)
    real = real_rows.gather(1, columns)
    torch.testing.assert_close(logits[real], logits_of(eager, expected.hidden_states)[real],
                               rtol=0, atol=ATOL)
    if config.rank == "last":  # ranking by the padding column would choose other visual tokens
        assert not torch.equal(oracle().columns, columns)


@pytest.mark.parametrize(("method", "shortv_layers"), [("fastv-last", (0, 1, 3)), ("vtw", (0, 2))])
def test_shortv_and_pruning_in_one_config(pair, method: str, shortv_layers: tuple) -> None:
    """ShortV + FastV (the paper's composition): ShortV layers before K freeze every visual token, from K on the kept
    ones (fast layers); equal to the oracle with the reference freeze, in prefill and greedy decoding, at batch 2
    with different visual counts; differs from the pruning alone (with VTW, a ShortV layer at K - 1 would not:
    nothing after it reads the visual rows it freezes, so layer 0 is chosen)."""
    family, model, eager = pair
    inputs = _mixed_inputs(model, family)
    config = _config(method)
    composed = TokenPruningConfig(config.method, config.k, config.ratio if method != "vtw" else None, config.rank,
                                  shortv_layers=list(shortv_layers))
    assert TokenPruningConfig.from_dict(composed.to_dict()) == composed
    alone = _run_pruned(model, config, inputs, generate=False)[0]
    logits, columns, generated = _run_pruned(model, composed, inputs)
    assert not any("forward" in layer.__dict__ for layer in model.model.language_model.layers)
    _check_each_sample(eager, inputs, config, logits, columns, shortv_layers)
    assert not torch.allclose(logits[:, -1], alone[:, -1], atol=1e-3)
    assert torch.equal(generated, _oracle_greedy(eager, inputs, config, shortv_layers)), (family, method)


def test_inner_entry_deep_copy_and_reapply(pair) -> None:
    """Calling the inner model (``model.model``) prunes the same way; a deep copy is an independent pruned model
    (removing it leaves the original pruned); applying again replaces the config."""
    family, model, _ = pair
    inputs = _inputs(model, family, padded=True)
    config = _config("fastv-last")
    logits, columns, _ = _run_pruned(model, config, inputs, generate=False)
    apply_token_pruning(model, _config("vtw"))
    apply_token_pruning(model, config)
    try:
        with torch.no_grad():
            reset_state(model)
            hidden = model.model(**inputs).last_hidden_state
            assert torch.equal(kept_columns(model), columns)
            torch.testing.assert_close(model.lm_head(hidden), logits, rtol=0, atol=1e-6)
            twin = copy.deepcopy(model)
            remove_token_pruning(twin)
            reset_state(model)
            torch.testing.assert_close(model(**inputs).logits, logits, rtol=0, atol=0)
            reset_state(twin)
            assert twin(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]
    finally:
        remove_token_pruning(model)


def test_torch_save_round_trip_and_hidden_states() -> None:
    """A pruned model pickles (saved before it runs: transformers' own output hooks, installed by the first vision
    forward, make a LLaVA unpicklable anyway); ``output_hidden_states`` shrinks from layer K - 1's output on."""
    import io

    model = build_model("llava", "sdpa", init_std=0.2)
    apply_fastv(model, k=2)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    inputs = _inputs(model, "llava", padded=False)
    seq, v = inputs["input_ids"].shape[1], int(inputs.visual_mask.sum())
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        assert torch.equal(loaded(**inputs).logits, out.logits)
        remove_token_pruning(loaded)
        assert loaded(**inputs).logits.shape[1] == seq
    kept = seq - v + TokenPruningConfig(k=2).kept(v)
    assert [h.shape[1] for h in out.hidden_states] == [seq, seq, kept, kept, kept]


@pytest.mark.parametrize("method", ["fastv-last", "vtw"])
def test_static_cache_generate_equals_the_oracle(pair, method: str) -> None:
    """A static cache: layers from K write the kept positions at the front of their buffer and the masks hide the
    unwritten slots; greedy decoding equals the oracle (different visual counts, left padding)."""
    family, model, eager = pair
    inputs = _mixed_inputs(model, family)
    config = _config(method)
    _, _, generated = _run_pruned(model, config, inputs, cache_implementation="static")
    assert torch.equal(generated, _oracle_greedy(eager, inputs, config)), (family, method)


#: Hybrid linear attention (Qwen3.5, layers [linear, full, linear, full]): layers < K see every token and their
#: conv / recurrent states include the visual ones; layers >= K, linear and full alike, run on the kept tokens, so
#: a linear layer's state from K on is built over the kept tokens in order (the oracle re-runs exactly those).
#: FastV ranks in a full-attention layer (K = 2); VTW cuts after a full (K = 2) or a linear (K = 3) layer. K must
#: pass the first full-attention layer, by which the model counts cached positions and sizes its masks.
HYBRID_SIZE = (16, 16)
HYBRID_ATOL = 3e-4  # the chunked delta rule sums in chunks aligned on each sequence's own length


@pytest.fixture(scope="module")
def hybrid(request):
    return build_model("qwen3_5", "sdpa", init_std=0.2), build_model("qwen3_5", "eager", init_std=0.2)


@pytest.mark.parametrize(("method", "k"), [("fastv-last", 2), ("vtw", 2), ("vtw", 3)])
def test_hybrid_linear_attention_equals_the_oracle(hybrid, method: str, k: int, monkeypatch) -> None:
    monkeypatch.setitem(FAMILIES, "qwen3_5", HYBRID_SIZE)
    _check_against_the_oracle("qwen3_5", *hybrid, method, True, k, HYBRID_ATOL)


def test_hybrid_different_visual_counts_rows_and_states(hybrid, monkeypatch) -> None:
    """Different visual counts at batch 2 with left padding: the padding slots and the left padding are zeroed
    before the linear layers' states (each sample equals the oracle run alone, prefill and greedy decoding); every
    layer from K on, linear or full, sees t + kept rows, and the full-attention one caches them."""
    monkeypatch.setitem(FAMILIES, "qwen3_5", HYBRID_SIZE)
    model, eager = hybrid
    inputs = _mixed_inputs(model, "qwen3_5")
    config = _config("fastv-last")
    logits, columns, generated = _run_pruned(model, config, inputs)
    _check_each_sample(eager, inputs, config, logits, columns, atol=HYBRID_ATOL)
    assert (columns == -1).any()
    assert torch.equal(generated, _oracle_greedy(eager, inputs, config))
    layers = model.model.language_model.layers
    rows, cache = _rows_and_cache(model, config, inputs)
    seq, width = inputs["input_ids"].shape[1], columns.shape[1]
    expected = [seq] * config.k + [width] * (len(layers) - config.k)
    assert rows == expected
    full = [i for i, layer in enumerate(layers) if layer.block_type == "full_attention"]  # linear: no count on 5.24
    assert [int(cache.get_seq_length(i)) for i in full] == [expected[i] for i in full]
    assert width < seq


@pytest.mark.parametrize(("method", "shortv_layers"), [("fastv-last", (0, 2, 3)), ("vtw", (0, 3))])
def test_hybrid_shortv_and_pruning_in_one_config(hybrid, method: str, shortv_layers: tuple, monkeypatch) -> None:
    """ShortV + FastV / VTW on the hybrid: frozen linear and full layers before K (every visual token) and from K on
    (the kept ones) equal the oracle with the reference freeze, prefill and greedy decoding, different visual counts;
    the composition differs from the pruning alone."""
    monkeypatch.setitem(FAMILIES, "qwen3_5", HYBRID_SIZE)
    model, eager = hybrid
    inputs = _mixed_inputs(model, "qwen3_5")
    config = _config(method)
    composed = TokenPruningConfig(config.method, config.k, config.ratio if method != "vtw" else None, config.rank,
                                  shortv_layers=list(shortv_layers))
    alone = _run_pruned(model, config, inputs, generate=False)[0]
    logits, columns, generated = _run_pruned(model, composed, inputs)
    _check_each_sample(eager, inputs, config, logits, columns, shortv_layers, HYBRID_ATOL)
    assert not torch.allclose(logits[:, -1], alone[:, -1], atol=1e-3)
    assert torch.equal(generated, _oracle_greedy(eager, inputs, config, shortv_layers))


def test_hybrid_fastv_ranks_in_a_full_attention_layer_only(hybrid) -> None:
    model, _ = hybrid
    with pytest.raises(ValueError, match=r"a linear-attention layer of .*; K must be one of \[2\]$"):
        apply_fastv(model, k=3)
    with pytest.raises(ValueError, match=r"needs K > 1: the model counts .* by its first full-attention layer, 1,"):
        apply_vtw(model, k=1)
    assert not hasattr(model, "_shortv_pruning_state")
    assert not any("forward" in layer.__dict__ for layer in model.model.language_model.layers)


def test_hybrid_vtw_rule_starts_at_the_first_k_the_model_allows(hybrid, monkeypatch) -> None:
    """VTW's KL rule on Qwen3.5 skips the K it refuses (K = 1: the cut must pass the first full-attention layer) and
    starts at K = 2; the means it records are the oracle's KL at those K."""
    from shortv.contribution import divergence_between
    from shortv.pruning import choose_vtw_layer
    from shortv.pruning.vtw import vtw_layers

    monkeypatch.setitem(FAMILIES, "qwen3_5", HYBRID_SIZE)
    model, eager = hybrid
    candidates, refused = vtw_layers(model)
    assert candidates[0] == 2 and candidates[-1] == len(model.model.language_model.layers) - 1 and refused is None
    inputs = _inputs(model, "qwen3_5", padded=True)
    reset_state(eager)
    with torch.no_grad():
        original = eager(**inputs).logits[:, -1].log_softmax(-1)
    reset_state(eager)
    calls = capture_decoder_calls(eager, inputs)
    out = pruned_forward(eager, calls, inputs.visual_mask, 2, torch.zeros(len(original), 0, dtype=torch.long))
    with torch.no_grad():
        withdrawn = eager.get_output_embeddings()(out.hidden_states[:, -1])
    expected = float(divergence_between(withdrawn.log_softmax(-1), original, "kl").mean())
    config = choose_vtw_layer(model, [inputs], 1e9)
    assert (config.k, config.provenance["first_k"]) == (2, 2)
    assert config.provenance["kl"] == pytest.approx([expected], rel=1e-3, abs=1e-6)
    with pytest.raises(ValueError, match=r"below 1e-30: K=2: [^,]+, K=3: [^,;]+$"):
        choose_vtw_layer(model, [inputs], 1e-30)


def test_hybrid_moe_and_static_cache(hybrid, monkeypatch) -> None:
    """Qwen3.5 MoE (FastV, batch 2, left padding) against the oracle; the dense hybrid's static cache (its linear
    layers' states beside static key/value buffers) decodes as the oracle."""
    monkeypatch.setitem(FAMILIES, "qwen3_5_moe", HYBRID_SIZE)
    model, eager = build_model("qwen3_5_moe", "sdpa", init_std=0.2), build_model("qwen3_5_moe", "eager", init_std=0.2)
    _check_against_the_oracle("qwen3_5_moe", model, eager, "fastv-last", True, 2, HYBRID_ATOL)
    monkeypatch.setitem(FAMILIES, "qwen3_5", HYBRID_SIZE)
    inputs = _mixed_inputs(hybrid[0], "qwen3_5")
    for config in (_config("fastv-last"), _config("vtw", k=3)):
        _, _, generated = _run_pruned(hybrid[0], config, inputs, cache_implementation="static")
        assert torch.equal(generated, _oracle_greedy(hybrid[1], inputs, config)), config


def test_deepstack_after_every_deepstack_layer(monkeypatch) -> None:
    """Qwen3-VL adds vision features after decoder layers 0..2 (DeepStack): with five layers, K = 4 cuts after all
    of them, and FastV and VTW equal the oracle (which replays the stock forward from layer 3's input); a smaller K
    is refused with the smallest valid one."""
    monkeypatch.setitem(FAMILIES, "qwen3_vl", (16, 16))
    five = dict(num_hidden_layers=5)
    model = build_model("qwen3_vl", "sdpa", init_std=0.2, text_overrides=five)
    eager = build_model("qwen3_vl", "eager", init_std=0.2, text_overrides=five)
    for method in ("fastv-last", "vtw"):
        _check_against_the_oracle("qwen3_vl", model, eager, method, True, 4)
    with pytest.raises(ValueError, match=r"needs K >= 4: it adds visual features .* after decoder layers 0\.\.2"):
        apply_vtw(model, k=3)
    assert not hasattr(model, "_shortv_pruning_state")


def test_ranking_reads_the_query_scale(monkeypatch) -> None:
    """Ministral 3 scales each query by its position: a per-query temperature, which leaves the order by one query's
    attention as it is (the oracle test above cannot see it), but not the values. The attention each column
    receives, averaged over the real queries, equals eager attention's."""
    from shortv.pruning.ranking import received_attention
    from shortv.registry import fast_layer_for

    monkeypatch.setitem(FAMILIES, "mistral3_ministral3", (16, 16))
    model = build_model("mistral3_ministral3", "eager", init_std=0.2)
    inputs = _inputs(model, "mistral3_ministral3", padded=True)
    calls = capture_decoder_calls(model, inputs)
    layers, weights = model.model.language_model.layers, []
    handle = layers[1].self_attn.register_forward_hook(lambda m, a, out: weights.append(out[1]))
    with torch.no_grad():
        hidden = layers[0](calls.hidden_states, **calls.kwargs[0])
        layers[1](hidden, **calls.kwargs[1])
        handle.remove()
        kwargs, real = calls.kwargs[1], inputs["attention_mask"]
        received = received_attention(layers[1], fast_layer_for(model).anatomy, hidden, kwargs["attention_mask"],
                                      kwargs["position_embeddings"], "mean", real, kwargs["position_ids"])
    expected = (weights[0].mean(dim=1) * real[:, :, None]).sum(dim=1) / real.sum(dim=1, keepdim=True)
    torch.testing.assert_close(received, expected, rtol=0, atol=1e-6)


def _check_step_logits(model, eager, family: str, config: TokenPruningConfig) -> None:
    """Each greedy step's logits (not only the argmax) equal the oracle's on the prompt's kept columns and the
    tokens so far (batch 2, left padding)."""
    inputs = _inputs(model, family, padded=True)
    visual, k = inputs.visual_mask, config.k
    apply_token_pruning(model, config)
    try:
        reset_state(model)
        out = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    finally:
        remove_token_pruning(model)
    reset_state(eager)
    ranked = pruned_forward(eager, capture_decoder_calls(eager, inputs), visual, k, _oracle_kept(config, visual))
    extended, prompt = inputs, visual.shape[1]
    for step in range(STEPS - 1):
        extended = extend_inputs(extended, out.sequences[:, prompt + step])
    reset_state(eager)
    oracle = pruned_forward(eager, capture_decoder_calls(eager, extended),
                            torch.cat([visual, visual.new_zeros(len(visual), STEPS - 1)], dim=1), k,
                            ranked.columns[visual.gather(1, ranked.columns)].view(len(visual), -1))
    expected = logits_of(eager, oracle.hidden_states[:, -STEPS:])
    torch.testing.assert_close(torch.stack(out.logits, dim=1), expected, rtol=0, atol=ATOL)


def test_sliding_window_layers(monkeypatch) -> None:
    """Gemma 3 (layers [sliding, full, sliding, full], window 8, shorter than an image; bidirectional attention
    between image tokens): FastV at K = 2 and VTW at K = 1 (which prunes the first full-attention layer, for whose
    cache the model lays out its step masks) equal the oracle at batch 2 with left padding, and with different visual
    counts, down to each decode step's logits: the pruned sliding layers' caches keep their last kept positions, and
    each step's window is by original position. A static cache's sliding layers are refused."""
    monkeypatch.setitem(FAMILIES, "gemma3", (16, 16))
    model, eager = build_model("gemma3", "sdpa", init_std=0.2), build_model("gemma3", "eager", init_std=0.2)
    for method, k in (("fastv-last", 2), ("vtw", 1)):
        _check_against_the_oracle("gemma3", model, eager, method, True, k)
        config = _config(method, k)
        inputs = _mixed_inputs(model, "gemma3")
        logits, columns, generated = _run_pruned(model, config, inputs)
        _check_each_sample(eager, inputs, config, logits, columns)
        assert torch.equal(generated, _oracle_greedy(eager, inputs, config))
        _check_step_logits(model, eager, "gemma3", config)
    with pytest.raises(ValueError, match="StaticSlidingWindowLayer"):
        _run_pruned(model, config, inputs, cache_implementation="static")


#: Gemma 4 with six layers [sliding, full] x 3 (window 4, shorter than an image; bidirectional attention within an
#: image): layers 4 and 5 reuse the keys and values that layers 2 and 3 write (KV sharing), every layer takes a
#: per-layer input (per token: cut to the kept columns from K on, in the oracle too), logits are soft-capped, and
#: generate's prefill runs the KV-sharing layers on the last position only (``logits_to_keep=1``).
GEMMA4_LAYERS = dict(num_hidden_layers=6, layer_types=["sliding_attention", "full_attention"] * 3,
                     num_kv_shared_layers=2)


@pytest.fixture(scope="module")
def gemma4():
    return (build_model("gemma4", "sdpa", init_std=0.2, text_overrides=GEMMA4_LAYERS),
            build_model("gemma4", "eager", init_std=0.2, text_overrides=GEMMA4_LAYERS))


@pytest.mark.parametrize(("method", "k"), [("fastv-last", 2), ("vtw", 1)])
def test_gemma4_kv_sharing_and_per_layer_inputs(gemma4, method: str, k: int, monkeypatch) -> None:
    """FastV (K = 2, ranking in a full layer) and VTW (K = 1, the first full layer pruned): prefill, greedy
    ``generate`` and each step's logits equal the oracle at batch 2 with left padding, and with different visual
    counts (padding slots); remove is bit-exact; every layer from K on sees t + kept rows, and the ones that hold
    keys/values cache them (the KV-sharing layers hold none); a ``logits_to_keep`` that keeps text positions only
    gives the same logits, one that keeps pruned positions is one line."""
    monkeypatch.setitem(FAMILIES, "gemma4", (16, 16))
    model, eager = gemma4
    config = _config(method, k)
    _check_against_the_oracle("gemma4", model, eager, method, True, k)
    _check_step_logits(model, eager, "gemma4", config)
    inputs = _mixed_inputs(model, "gemma4")
    logits, columns, generated = _run_pruned(model, config, inputs)
    _check_each_sample(eager, inputs, config, logits, columns)
    assert (columns == -1).any()
    assert torch.equal(generated, _oracle_greedy(eager, inputs, config))
    rows, cache = _rows_and_cache(model, config, inputs)
    seq, width = inputs["input_ids"].shape[1], columns.shape[1]
    assert rows == [seq] * k + [width] * (6 - k) and width < seq
    assert [int(cache.get_seq_length(i)) for i in range(4)] == [seq] * k + [width] * (4 - k)
    assert [type(layer).__name__ for layer in cache.layers[4:]] == ["DummyLayer"] * 2
    apply_token_pruning(model, config)
    try:
        with torch.no_grad():
            reset_state(model)
            torch.testing.assert_close(model(**inputs, logits_to_keep=3).logits, logits[:, -3:], rtol=0, atol=1e-5)
            with pytest.raises(ValueError, match=r"gets the prompt's last 12 positions only \(logits_to_keep\), and "
                                                 "FastV/VTW pruned some of them"):
                reset_state(model)
                model(**inputs, logits_to_keep=12)
    finally:
        remove_token_pruning(model)


def test_gemma4_shortv_and_fastv_and_the_k_refusal(gemma4, monkeypatch) -> None:
    """ShortV + FastV on Gemma 4 (frozen layers before K, at a K/V-writing layer from K on and at a K/V-reading
    one) equals the oracle with the reference freeze, prefill and greedy decoding; a K after a layer whose keys
    and values a later layer reuses is refused with one line naming the valid K, the model untouched."""
    monkeypatch.setitem(FAMILIES, "gemma4", (16, 16))
    model, eager = gemma4
    config, shortv_layers = _config("fastv-last"), (0, 3, 5)
    composed = TokenPruningConfig("fastv", config.k, config.ratio, shortv_layers=list(shortv_layers))
    inputs = _mixed_inputs(model, "gemma4")
    alone = _run_pruned(model, config, inputs, generate=False)[0]
    logits, columns, generated = _run_pruned(model, composed, inputs)
    _check_each_sample(eager, inputs, config, logits, columns, shortv_layers)
    assert not torch.allclose(logits[:, -1], alone[:, -1], atol=1e-3)
    assert torch.equal(generated, _oracle_greedy(eager, inputs, config, shortv_layers))
    for k in (3, 5):
        with pytest.raises(ValueError, match=r"^FastV on Gemma4ForConditionalGeneration needs K in \[1, 2\]: layers "
                                             r"reuse the keys and values of earlier layers \(4 <- 2, 5 <- 3\)"):
            apply_fastv(model, k=k)
    assert not hasattr(model, "_shortv_pruning_state")
    assert not any("forward" in layer.__dict__ for layer in model.model.language_model.layers)


def test_gemma4_vtw_rule_searches_the_valid_k_only(gemma4, monkeypatch) -> None:
    """VTW's KL rule on Gemma 4 tries K = 1, 2 (the K its KV sharing allows) and stops there: a threshold no K meets
    is one line with both means and the refusal of K = 3; a loose one chooses K = 1."""
    from shortv.pruning import choose_vtw_layer

    monkeypatch.setitem(FAMILIES, "gemma4", (16, 16))
    model, _ = gemma4
    batches = [_inputs(model, "gemma4", padded=True)]
    with pytest.raises(ValueError, match=r"below 1e-09: K=1: [^,]+, K=2: [^,;]+; larger K are refused: VTW on "
                                         r"Gemma4ForConditionalGeneration needs K in \[1, 2\]"):
        choose_vtw_layer(model, batches, 1e-9)
    config = choose_vtw_layer(model, batches, 1e9)
    assert config.k == 1 and len(config.provenance["kl"]) == 1
    assert not hasattr(model, "_shortv_pruning_state")
