"""One harness for every method (`shortv.methods`): evaluate, ``shortv eval``, ``shortv bench`` and the records they
write, for ShortV, FastV, VTW and ShortV + FastV on the embedded tiny LLaVA (oracle: the method applied by hand
through its own API, then ``generate``)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from shortv import ShortVConfig, apply_shortv, remove_shortv
from shortv.cli import app
from shortv.data import read_jsonl
from shortv.evaluation import batch_inputs, evaluate
from shortv.flops import LayerDims, flops_ratio
from shortv.flops_pruning import fastv_ratio, vtw_ratio
from shortv.methods import applied_config, load_config, method_of, plan_runs
from shortv.pruning import TokenPruningConfig, apply_token_pruning, remove_token_pruning

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
SHORTV = ShortVConfig(layers=[3, 5, 7, 9])
CONFIGS = {
    "shortv": SHORTV,
    "fastv": TokenPruningConfig("fastv", k=2, ratio=0.5),
    "vtw": TokenPruningConfig("vtw", k=4),
    "shortv+fastv": TokenPruningConfig("fastv", k=3, ratio=0.75, rank="mean", shortv_layers=[1, 5, 7, 9]),
}
BATCH, NEW_TOKENS = 2, 4


@pytest.fixture(scope="module")
def embedded():
    from shortv.tiny import embedded_split_path, load_embedded

    model, processor = load_embedded()
    samples = read_jsonl(embedded_split_path("test"))[:4]
    return model.eval(), processor, samples


@pytest.fixture(scope="module")
def multi(embedded, tmp_path_factory):
    """One evaluation of every method, written to a folder."""
    model, processor, samples = embedded
    out = tmp_path_factory.mktemp("multi")
    summary = evaluate(model, processor, samples, list(CONFIGS.values()), batch_size=BATCH, max_new_tokens=NEW_TOKENS,
                       out_dir=out, progress=False)
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return summary, records, out


def by_hand(model, processor, samples, config) -> tuple[list[str], torch.Tensor]:
    """The method applied through its own API: greedy answers batch by batch, and the first step's logits."""
    apply = apply_shortv if isinstance(config, ShortVConfig) else apply_token_pruning
    answers, first = [], []
    tokenizer = processor.tokenizer
    if config is not None:
        apply(model, config)
    try:
        for start in range(0, len(samples), BATCH):
            inputs = batch_inputs(processor, samples[start : start + BATCH])
            with torch.no_grad():
                first.append(model(**inputs).logits[:, -1])
                output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1,
                                        pad_token_id=tokenizer.pad_token_id)
            new = output[:, inputs["input_ids"].shape[1] :]
            answers += [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        if config is not None:
            (remove_shortv if isinstance(config, ShortVConfig) else remove_token_pruning)(model)
    return answers, torch.cat(first)


def test_each_method_through_evaluate_equals_the_method_applied_by_hand(embedded, multi) -> None:
    model, processor, samples = embedded
    summary, records, _ = multi
    baseline, baseline_logits = by_hand(model, processor, samples, None)
    assert [record["baseline"] for record in records] == baseline
    dims = LayerDims.from_config(model.config)  # FLOPs at the mean token counts of the samples
    t = round(sum(r["text_tokens"] for r in records) / len(records))
    v = round(sum(r["visual_tokens"] for r in records) / len(records))
    expected_flops = {
        "shortv": flops_ratio(dims, t, v, SHORTV.layers, "exact"),
        "fastv": fastv_ratio(dims, t, v, 2, 0.5),
        "vtw": vtw_ratio(dims, t, v, 4),
        "shortv+fastv": fastv_ratio(dims, t, v, 3, 0.75, frozen_layers=[1, 5, 7, 9]),
    }
    assert [row.key for row in summary.methods] == list(CONFIGS)
    for row in summary.methods:
        answers, logits = by_hand(model, processor, samples, CONFIGS[row.key])
        assert [record[row.key] for record in records] == answers, row.key
        assert not torch.allclose(logits, baseline_logits, atol=1e-3), f"{row.key} computes the baseline"
        assert row.flops_ratio == pytest.approx(expected_flops[row.key], rel=1e-12) and row.flops_ratio < 1
        assert row.scores.accuracy == sum(r[f"{row.key}_correct"] for r in records) / len(records)
        assert row.agreement == sum(r[row.key] == r["baseline"] for r in records) / len(records)
    assert applied_config(model) is None  # the model is left as it came


def test_a_multi_method_run_equals_the_single_runs(embedded, multi) -> None:
    model, processor, samples = embedded
    summary, records, _ = multi
    for index, (key, config) in enumerate(CONFIGS.items()):
        if index % 2:  # two of the four singles suffice to show the rows are independent of each other
            continue
        apply = apply_shortv if isinstance(config, ShortVConfig) else apply_token_pruning
        apply(model, config)  # evaluate without a config: the method applied to the model
        single = evaluate(model, processor, samples, batch_size=BATCH, max_new_tokens=NEW_TOKENS, progress=False)
        assert applied_config(model) == config  # left applied, as it came
        method_of(config).remove(model)
        row = next(row for row in summary.methods if row.key == key)
        assert (single.methods[0].key, single.methods[0].method) == (key, row.method)
        for field in ("agreement", "flops_ratio"):
            assert getattr(single.methods[0], field) == getattr(row, field)
        assert single.methods[0].scores.per_type == row.scores.per_type
        assert single.baseline.per_type == summary.baseline.per_type


def test_records_round_trip(multi, tmp_path) -> None:
    summary, _, out = multi
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary.to_dict()))
    assert [row["method"] for row in saved["methods"]] == [method_of(c).record(c) for c in CONFIGS.values()]
    assert saved["methods"][3]["method"] == {"method": "shortv+fastv", "layers": [1, 5, 7, 9], "k": 3, "ratio": 0.75,
                                             "rank": "mean"}
    run = json.loads((out / "eval_run.json").read_text())
    assert run["methods"] == list(CONFIGS) and run["fastv.ratio"] == 0.5 and run["vtw.k"] == 4
    markdown = (out / "summary.md").read_text()
    assert "| vtw | " in markdown and "- shortv+fastv: shortv+fastv layers=[1,5,7,9] k=3 ratio=0.75 rank=mean" in markdown
    for name, config in CONFIGS.items():  # any config file loads back as its own type, the same method
        path = config.save(tmp_path / f"{name}.json")
        loaded = load_config(path)
        assert loaded == config and method_of(loaded).name == name


def test_resume_with_other_parameters_is_refused_and_changes_nothing(embedded, tmp_path, monkeypatch) -> None:
    import shortv.evaluation as evaluation

    model, processor, samples = embedded
    configs = [CONFIGS["fastv"], CONFIGS["vtw"]]
    real, calls = evaluation.generate_answers, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the second batch's baseline
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "generate_answers", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, processor, samples, configs, batch_size=BATCH, max_new_tokens=2, out_dir=tmp_path,
                 progress=False)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    changed = [TokenPruningConfig("fastv", k=2, ratio=0.25), CONFIGS["vtw"]]
    with pytest.raises(ValueError, match=r"other settings \(fastv.ratio: 0.5 before, 0.25 now\)"):
        evaluate(model, processor, samples, changed, batch_size=BATCH, max_new_tokens=2, out_dir=tmp_path,
                 resume=True, progress=False)
    with pytest.raises(ValueError, match=r"methods: \['fastv', 'vtw'\] before, \['fastv'\] now; vtw.k: 4 before"):
        evaluate(model, processor, samples, configs[:1], batch_size=BATCH, max_new_tokens=2, out_dir=tmp_path,
                 resume=True, progress=False)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    monkeypatch.setattr(evaluation, "generate_answers", real)
    resumed = evaluate(model, processor, samples, configs, batch_size=BATCH, max_new_tokens=2, out_dir=tmp_path,
                       resume=True, progress=False)
    assert resumed.num_samples == 4 and [row.key for row in resumed.methods] == ["fastv", "vtw"]


def single_error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize(("arguments", "message"), [
    (["--method", "fastv", "--ratio", "1.5"], r"R \(the fraction of visual tokens pruned\) must be in \[0, 1\)"),
    (["--method", "fastv:ratio=-0.1"], r"must be in \[0, 1\), got -0.1"),
    (["--method", "fastv:k=12"], r"K \(the first pruned layer\) must be in 1..11 for a model of 12 decoder layers"),
    (["--method", "vtw:k=3", "--ratio", "0.5"], r"--ratio applies to fastv / shortv\+fastv; vtw takes no ratio"),
    (["--method", "vtw"], r"--method 'vtw' needs K"),
    (["--method", "fastv:n=3"], r"fastv takes no n \(it takes k, ratio, rank\)"),
    (["--method", "shortv+fastv"], r"needs ShortV layers"),
    (["--method", "fastv:k=two"], r"k must be int, got 'two'"),
    (["--method", "fastv2"], r"unknown method 'fastv2'; known: shortv, fastv, vtw, shortv\+fastv, shortv\+vtw"),
])
def test_bad_parameters_are_one_error_line_and_nothing_is_written(tmp_path, arguments, message) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["eval", *arguments, "--num-samples", "2", "--out", str(out)])
    import re

    assert re.search(message, single_error_line(result))
    assert not out.exists()


def test_cli_compares_two_config_files_of_different_methods(tmp_path) -> None:
    """``--config a --config b``: one row each, as `evaluate` with both configs (the unpatched model loads once)."""
    shortv = SHORTV.save(tmp_path / "shortv_config.json")
    fastv = CONFIGS["fastv"].save(tmp_path / "fastv.json")
    out = tmp_path / "out"
    result = runner.invoke(app, ["eval", "--config", str(shortv), "--config", str(fastv), "--method", "vtw:k=4",
                                 "--num-samples", "2", "--max-new-tokens", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert [row["key"] for row in summary["methods"]] == ["shortv", "fastv", "vtw"]
    assert summary["layers"] == SHORTV.layers  # the first row's, as in a one-method summary
    assert "| fastv | " in result.output and "| vtw | " in result.output


def test_fastv_on_a_bare_lm_without_visual_ids_is_refused_before_generating(embedded) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    _, processor, samples = embedded
    bare = LlamaForCausalLM(LlamaConfig(vocab_size=processor.tokenizer.vocab_size + 16, hidden_size=32,
                                        intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                        max_position_embeddings=512)).eval()
    with pytest.raises(ValueError, match="fastv needs the visual positions: LlamaForCausalLM declares no visual"):
        evaluate(bare, processor, samples[:1], TokenPruningConfig("fastv", k=1), progress=False)
    assert applied_config(bare) is None


def test_an_unsupported_family_is_refused_before_any_run() -> None:
    """Every tiny family runs FastV now; a bare Phi-3 (not in the registry: no verified layer anatomy) does not."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from shortv.benchmark import BenchInputs, benchmark

    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, pad_token_id=0,
                                       eos_token_id=1, bos_token_id=2)).eval()
    ids = torch.zeros(1, 8, dtype=torch.long)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[:, 2:6] = True
    with pytest.raises(ValueError, match="FastV does not support model_type='phi3'"):
        benchmark(model, BenchInputs.for_causal_lm(ids, mask), TokenPruningConfig("fastv", k=1), repeats=1, warmup=0)
    assert applied_config(model) is None


def test_bench_shape_mode_with_fastv_at_a_two_layer_prefix(monkeypatch, tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from shortv.benchmark import BenchResult, bench_shape, shapes

    def tiny(name, num_layers, **options):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        return LlamaForCausalLM(config).eval()

    monkeypatch.setattr(shapes, "build_shape_model", tiny)  # the real dims are too big for CI
    result = bench_shape("llava-1.5-7b", num_layers=2, method="fastv", k=1, ratio=0.5, visual_tokens=12,
                         text_tokens=4, dtype="fp32", new_tokens=2, repeats=1, warmup=0)
    assert result.method == {"method": "fastv", "k": 1, "ratio": 0.5, "rank": "last"}
    assert result.num_layers == 2 and result.full_num_layers == 32 and result.visual_tokens == [12]
    dims = LayerDims.from_config(tiny("", 2).config)
    head = 2 * dims.hidden_size * dims.vocab_size
    from shortv.flops import model_flops
    from shortv.flops_pruning import budget_flops, fastv_budget

    dense = model_flops(dims, 4, 12, (), "exact") + head
    assert result.ideal_speedup == pytest.approx(dense / (budget_flops(dims, 4, fastv_budget(dims, 12, 1, 0.5)) + head))
    assert BenchResult.load(result.save(tmp_path / "b.json")) == result
    both = bench_shape("qwen2-vl-7b", num_layers=2, method="shortv+fastv", k=1, proportional=True, visual_tokens=12,
                       text_tokens=4, dtype="fp32", new_tokens=2, repeats=1, warmup=0)
    assert both.method["method"] == "shortv+fastv" and both.method["layers"] == both.shortv_layers
    with pytest.raises(ValueError, match="fastv takes no ShortV layers, but a ShortV config was given"):
        bench_shape("llava-1.5-7b", num_layers=2, config=ShortVConfig([1]), method="fastv", k=1)
    result = runner.invoke(app, ["bench", "--shape", "llava-1.5-7b", "--layers", "2", "--method", "fastv"])
    assert "K (the first pruned layer) must be in 1..1 for a model of 2 decoder layers, got 2" in single_error_line(
        result)


def test_plan_refuses_a_flag_no_method_takes_and_keeps_one_of_identical_runs() -> None:
    runs = plan_runs(["shortv"], [SHORTV])  # the spec takes the config's layers: the same run, once
    assert [run.key for run in runs] == ["shortv"]
    runs = plan_runs(["fastv:k=2", "fastv:k=3"], k=5)
    assert [(run.key, run.config.k) for run in runs] == [("fastv", 2), ("fastv_2", 3)]
    with pytest.raises(ValueError, match="--k applies to fastv / vtw / shortv\\+fastv / shortv\\+vtw; give --method"):
        plan_runs([], [SHORTV], k=2)


def test_the_baseline_of_each_method_is_the_unpatched_model_bit_exactly(embedded) -> None:
    model, processor, samples = embedded
    inputs = batch_inputs(processor, samples[:BATCH])
    with torch.no_grad():
        plain = model(**inputs).logits
        for name, config in CONFIGS.items():
            method = method_of(config)
            method.apply(model, config)
            with method.unpatched(model, config):
                assert torch.equal(model(**inputs).logits, plain), name
            assert applied_config(model) == config  # in force again after the block
            method.remove(model)
            assert applied_config(model) is None and torch.equal(model(**inputs).logits, plain), name


@pytest.mark.parametrize(("arguments", "message"), [
    (["--method", "vtw"], r"--method 'vtw' needs K"),
    (["--method", "fastv", "--ratio", "2"], r"R \(the fraction of visual tokens pruned\) must be in \[0, 1\), got 2.0"),
    (["--k", "2"], r"--k applies to fastv / vtw / shortv\+fastv / shortv\+vtw; give --method"),
])
def test_bench_refuses_bad_method_parameters_before_loading_a_model(monkeypatch, arguments, message) -> None:
    import re

    from shortv import benchmark

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the parameters were checked")

    for name in ("bench_embedded", "bench_shape", "bench_pretrained"):
        monkeypatch.setattr(benchmark, name, no_model)
    assert re.search(message, single_error_line(runner.invoke(app, ["bench", *arguments])))


def test_evaluate_leaves_a_switched_off_shortv_as_it_came(embedded) -> None:
    """`evaluate` takes the model's own method off for the run and puts it back, switched off if it came so."""
    from shortv import get_shortv_state

    model, processor, samples = embedded
    apply_shortv(model, SHORTV)
    get_shortv_state(model).enabled = False
    try:
        evaluate(model, processor, samples[:BATCH], [CONFIGS["fastv"]], batch_size=BATCH, max_new_tokens=2,
                 progress=False)
        state = get_shortv_state(model)
        assert state is not None and state.config == SHORTV and state.enabled is False
    finally:
        remove_shortv(model)
