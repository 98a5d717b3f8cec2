"""`shortv calibrate` as a library call: data -> Layer Contribution -> order, config, table and plot on disk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ShortVConfig
from .contribution import DIVERGENCES, OPERATOR_TOKEN_TYPES, RUN_FILE, SAMPLES_FILE, TOKEN_TYPES, LCResult, \
    layer_contribution
from .data import POSITIONS, CalibrationSamples, check_context, file_sha256, read_jsonl, subsample
from .files import exclusive_output, replaced_on_success
from .loading import context_length, inputs_for, load_model, model_id_of, resolve_model
from .processes import is_main_process, main_holds, on_main, process_device_map
from .records import check_fresh, check_weights
from .registry import find_decoder_layers, visual_token_ids
from .selection import select_layers, select_operators

LC_FILE = "lc.json"
CONFIG_FILE = "shortv_config.json"
PLOT_FILE = "lc.png"
#: With ``operators=True``: the operator-level config (at the layer-level config's FLOPs) and the LC heatmap.
OPERATOR_CONFIG_FILE = "shortv_operators_config.json"
VTW_CONFIG_FILE = "vtw_config.json"
#: Calibration inputs per forward of VTW's KL rule.
VTW_BATCH_SIZE = 8
OPERATOR_PLOT_FILE = "lc_operators.png"


def default_n(num_layers: int) -> int:
    """The paper's operating point, 19 of 32 layers for LLaVA-1.5-7B, scaled to this depth."""
    return round(num_layers * 19 / 32)


def mean_token_counts(model: Any, samples: CalibrationSamples) -> tuple[int, int]:
    """(text, visual) tokens of the calibration inputs, mean over samples: the input the FLOPs budget is priced at."""
    ids = visual_token_ids(model)
    text = visual = 0
    for sample in samples:
        input_ids = sample.inputs["input_ids"]
        count = sum(int((input_ids == token).sum()) for token in ids)
        visual, text = visual + count, text + int(input_ids.numel()) - count
    return max(1, round(text / len(samples))), round(visual / len(samples))


@dataclass
class Calibration:
    lc: LCResult
    config: ShortVConfig
    out_dir: Path
    #: With ``operators=True``: operators chosen by per-operator LC per FLOP, at most the layer-level FLOPs.
    operator_config: ShortVConfig | None = None
    #: With ``vtw_threshold``: VTW at the K its KL rule chose on the same samples (`shortv.pruning.choose_vtw_layer`).
    vtw_config: Any = None

    def table(self) -> list[tuple[int, float, float | None, int]]:
        """(layer, visual LC, text LC, rank in the ShortV order) per layer."""
        means, rank = self.lc.mean, {layer: index + 1 for index, layer in enumerate(self.lc.order)}
        text = means.get("text")
        return [
            (layer, means["visual"][layer], None if text is None else text[layer], rank[layer])
            for layer in range(self.lc.num_layers)
        ]


def calibrate(
    model: Any = None,
    data: str | Path | None = None,
    out_dir: str | Path = "shortv_calibration",
    num_samples: int | None = None,
    n: int | None = None,
    resume: bool = False,
    position: str = "last_prompt",
    divergence: str = "kl",
    seed: int = 0,
    dtype: str | None = None,
    device_map: str | None = None,
    progress: bool = True,
    plot: bool = True,
    processor: Any = None,
    model_id: str | None = None,
    trust_remote_code: bool = False,
    operators: bool = False,
    flops: float | None = None,
    vtw_threshold: float | None = None,
) -> Calibration:
    """Calibrate LC on ``data`` (default: the embedded model's calib split) and write lc.json, config and plot.

    ``model`` is a path/hub id (or None for the embedded model), or an already loaded model with ``processor``
    (``model_id`` defaults to the folder or hub id it was loaded from).
    Everything is checked before the model runs: the data (every line, every image), ``n`` against the layer count,
    the output folder (not in use by another process, no earlier results unless ``resume``) and every input's length.
    Under a distributed launcher each process loads its own copy of the model and computes its share of the samples
    (`shortv.processes`); every process returns the whole result, and the main process writes the files.

    ``operators``: also the per-operator LC (attention and MLP updates of visual tokens, `shortv.contribution`),
    its heatmap, and an operator-level config chosen by LC per FLOP saved (`shortv.selection.select_operators`) at
    a prefill FLOPs ratio of ``flops`` (default: the layer-level config's), priced at the calibration inputs' mean
    token counts.

    ``vtw_threshold``: also VTW's K by its own rule, on the same samples: the first K whose mean
    KL(withdrawn || original) of the last prompt position's next-token distribution is below the threshold
    (`shortv.pruning.choose_vtw_layer`), written to vtw_config.json with the threshold and every mean. Checked before
    LC runs (a family VTW does not support is refused then); no K under the threshold is an error after lc.json and
    the ShortV config are written.
    """
    if vtw_threshold is not None and (isinstance(vtw_threshold, bool) or not vtw_threshold > 0):
        raise ValueError(f"the VTW KL threshold must be a positive number, got {vtw_threshold!r}")
    if flops is not None and not operators:
        raise ValueError("a FLOPs target (--flops, flops=) is for the operator-level selection: add --operators "
                         "(operators=True)")
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    if data is None:
        from .tiny import embedded_split_path

        data = embedded_split_path("calib")
    samples = subsample(read_jsonl(data, require_answer=position == "answer"), num_samples, seed)
    if model is None or isinstance(model, (str, Path)):
        source = resolve_model(model, trust_remote_code)
        num_layers, model_id = source.num_layers, source.model_id
    elif processor is None:
        raise ValueError("a loaded model needs its processor (processor=...)")
    else:
        source, num_layers = None, len(find_decoder_layers(model))
        model_id = model_id or model_id_of(model)
    n = default_n(num_layers) if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= num_layers:
        raise ValueError(f"n must be in 0..{num_layers} (the model's decoder layers), got {n!r}")

    with main_holds(exclusive_output, out_dir) as out_dir:  # several processes: the main one writes the results
        if not resume:
            on_main(check_fresh, out_dir, (SAMPLES_FILE, LC_FILE, CONFIG_FILE, OPERATOR_CONFIG_FILE, VTW_CONFIG_FILE))
        elif source is not None:  # other weights than the interrupted run's: refused before they load
            on_main(check_weights, out_dir, RUN_FILE, source.fingerprint)
        if source is not None:
            model, processor, model_id = load_model(source, dtype=dtype, device_map=process_device_map(device_map))
        check_context(processor, samples, context_length(model.config), with_answer=position == "answer")
        if vtw_threshold is not None:
            _check_vtw(model)
        calibration_samples = CalibrationSamples(processor, samples, position=position)
        lc = layer_contribution(
            model,
            calibration_samples,
            token_types=TOKEN_TYPES + (tuple(OPERATOR_TOKEN_TYPES) if operators else ()),
            divergence=divergence,
            model_id=model_id,
            out_dir=out_dir,
            resume=resume,
            progress=progress,
            metadata={"data": str(Path(data).resolve()), "data_sha256": file_sha256(data), "position": position,
                      "seed": seed, "num_samples_requested": num_samples},
            weights=None if source is None else source.fingerprint,
        )
        config = select_layers(lc, n=n)
        config.provenance["lc"] = str(out_dir / LC_FILE)
        operator_config = None
        if operators:
            text_tokens, visual_tokens = mean_token_counts(model, calibration_samples)
            budget = dict(dims=model.config, text_tokens=text_tokens, visual_tokens=visual_tokens)
            target = _layer_ratio(config, **budget) if flops is None else flops  # equal FLOPs by default
            operator_config = select_operators(lc, flops_ratio=target, **budget)
            operator_config.provenance["lc"] = str(out_dir / LC_FILE)
        if is_main_process():
            lc.save(out_dir / LC_FILE)
            config.save(out_dir / CONFIG_FILE)
            if plot:
                from .plots import plot_layer_contribution
                from .registry import layer_types

                with replaced_on_success(out_dir / PLOT_FILE) as plot_path:
                    plot_layer_contribution(lc, plot_path, chosen=config.layers, layer_types=layer_types(model))
            if operator_config is not None:
                operator_config.save(out_dir / OPERATOR_CONFIG_FILE)
                if plot:
                    from .plots import plot_operator_contribution

                    with replaced_on_success(out_dir / OPERATOR_PLOT_FILE) as plot_path:
                        plot_operator_contribution(lc, plot_path, chosen=operator_config.frozen_operators)
        vtw_config = None
        if vtw_threshold is not None:
            vtw_config = vtw_rule(model, processor, samples, vtw_threshold)
            vtw_config.provenance["data"] = str(Path(data).resolve())
            if is_main_process():
                vtw_config.save(out_dir / VTW_CONFIG_FILE)
    return Calibration(lc=lc, config=config, out_dir=out_dir, operator_config=operator_config, vtw_config=vtw_config)


def _check_vtw(model: Any) -> None:
    """VTW applies to this model at some K (one line otherwise), before any LC is computed."""
    from .pruning.vtw import vtw_layers

    vtw_layers(model)


def vtw_rule(model: Any, processor: Any, samples: list, threshold: float, batch_size: int = VTW_BATCH_SIZE) -> Any:
    """VTW's config at the K its KL rule picks on the VQA ``samples`` (left-padded batches of ``batch_size``;
    `shortv.pruning.choose_vtw_layer`)."""
    from .evaluation import batch_inputs
    from .pruning import choose_vtw_layer

    batches = [inputs_for(model, batch_inputs(processor, samples[start:start + batch_size]))
               for start in range(0, len(samples), batch_size)]
    return choose_vtw_layer(model, batches, threshold)


def _layer_ratio(config: ShortVConfig, dims: Any, text_tokens: int, visual_tokens: int) -> float:
    """The prefill FLOPs ratio of a layer-level config at these token counts."""
    from .flops import LayerDims, flops_ratio

    return flops_ratio(LayerDims.from_config(dims), text_tokens, visual_tokens, config.layers, formula="exact")
