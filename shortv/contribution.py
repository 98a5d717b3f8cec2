"""Layer Contribution (LC): how much removing one layer's updates to visual (or text) tokens moves the output.

For a sample, ``P`` is the next-token distribution at the last prompt position of the unmodified model, and
``P_l^X`` the same with only layer ``l``'s updates to X-tokens removed (the reference freeze). By default
``LC_l^X = KL(P_l^X || P)``, the direction of the code published with the paper, averaged over samples; ShortV
freezes visual tokens in the layers with the lowest mean visual LC.

Efficient and exact: one unmodified pass captures every layer's input and call arguments. Variant ``l`` needs no
extra work at layer ``l`` (the frozen output is the captured input/output pair, mixed by the token mask), so it
replays only layers ``l+1..L-1``; variants are batched together, and the last layer computes only the query
positions that are scored. Per sample that is about ``L*L`` layer evaluations against ``2*L*(L+1)`` for the naive
method (one full forward per variant). Updates a family makes between layers, outside them (Qwen3-VL's DeepStack
adds vision features after the first layers), are recorded in the capture pass and replayed after the same layers.
A store that one layer writes and later layers read (Gemma 4's shared keys and values) holds, for a variant that
joins the replay after the writing layer, what the capture pass wrote there.

Per-operator LC (token types ``visual_attention`` and ``visual_mlp``): the same with only layer ``l``'s attention
update, or only its MLP update, removed on visual rows (`shortv.frozen.operators`, the reference operator freeze).
Such a variant does need layer ``l``: it is run once on the captured input, for both operators together (a batch of
two, each row silencing its operator), then the variants join the same batched replay of the later layers.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .files import atomic_write_text, exclusive_output, read_json
from .fingerprint import WeightsFingerprint, fingerprint_model, recorded_fingerprint
from .frozen.operators import ZeroRows, operator_modules
from .layout import TokenLayout
from .loading import inputs_for
from .patch import disable_shortv, get_shortv_state
from .placement import execution_device
from .processes import is_main_process, main_holds, on_main, process_count, process_index, share
from .records import append_records, merge_shards, shard_path, start_run
from .registry import (
    fast_layer_for,
    find_decoder_layers,
    find_final_norm,
    find_inter_layer_update,
    layer_anatomy,
    visual_token_ids,
)

TOKEN_TYPES = ("visual", "text")
#: Per-operator LC of visual tokens: only the attention update, or only the MLP update, of a layer removed.
OPERATOR_TOKEN_TYPES = {"visual_attention": "attention", "visual_mlp": "mlp"}
ALL_TOKEN_TYPES = (*TOKEN_TYPES, *OPERATOR_TOKEN_TYPES)
DIVERGENCES = ("kl", "kl_reversed", "js")
LC_FORMAT_VERSION = 1
SAMPLES_FILE = "lc_samples.jsonl"
RUN_FILE = "lc_run.json"


@dataclass
class CalibrationSample:
    """One calibration example as model inputs (batch of one).

    ``target_positions``: positions whose next-token distributions are compared (default: the last one, i.e. the
    last prompt position). ``visual_mask`` (1 x seq, bool) is needed only when the input ids do not mark visual
    tokens (bare language models, custom MLLMs).
    """

    id: str
    inputs: dict[str, Any]
    target_positions: tuple[int, ...] | None = None
    visual_mask: torch.Tensor | None = None


@dataclass
class LCResult:
    """Per-sample and mean LC per layer and token type, the ShortV layer order, and how it was computed."""

    num_layers: int
    token_types: tuple[str, ...]
    sample_ids: list[str]
    per_sample: dict[str, list[list[float]]]
    model_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    version: int = LC_FORMAT_VERSION
    #: The weights it was computed on (`shortv.fingerprint`); None in files of older versions.
    weights: WeightsFingerprint | None = None

    def __post_init__(self) -> None:
        """Shapes agree and every value is a finite number, so no NaN is ever saved or ranked."""
        for token_type, rows in self.per_sample.items():
            if len(rows) != len(self.sample_ids):
                raise ValueError(f"{len(rows)} rows of {token_type} LC for {len(self.sample_ids)} sample ids")
            for sample_id, row in zip(self.sample_ids, rows):
                if len(row) != self.num_layers:
                    raise ValueError(f"sample {sample_id!r}: {len(row)} {token_type} LC values for {self.num_layers} layers")
                if not all(math.isfinite(value) for value in row):
                    raise ValueError(f"sample {sample_id!r}: {token_type} LC is not finite: {row}")

    @property
    def mean(self) -> dict[str, list[float]]:
        """Arithmetic mean over samples, per token type and layer."""
        means = {}
        for token_type, rows in self.per_sample.items():
            if not rows:
                raise ValueError("LCResult has no samples")
            means[token_type] = [math.fsum(row[layer] for row in rows) / len(rows) for layer in range(self.num_layers)]
        return means

    @property
    def order(self) -> list[int]:
        """Layers by ascending mean visual LC; ShortV takes a prefix of this.

        Ties (equal means, e.g. the exact zeros of layers whose visual updates nothing downstream reads) go to the
        lower layer index first, so the order is a pure function of the numbers.
        """
        if "visual" not in self.per_sample:
            raise ValueError("the ShortV order needs visual LC; this result has only " + ", ".join(self.token_types))
        visual = self.mean["visual"]
        return sorted(range(self.num_layers), key=lambda layer: (visual[layer], layer))

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "model_id": self.model_id,
            "num_layers": self.num_layers,
            "token_types": list(self.token_types),
            "order": self.order if "visual" in self.per_sample else None,
            "mean": self.mean,
            "sample_ids": self.sample_ids,
            "per_sample": self.per_sample,
            "metadata": self.metadata,
            "weights": None if self.weights is None else self.weights.compact().to_dict(),
        }

    def save(self, path: str | Path) -> Path:
        """Write the JSON form atomically (strict JSON: values are finite by construction)."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LCResult:
        """Read an ``lc.json``; every problem is a ValueError (or FileNotFoundError) naming the file."""
        data = read_json(path)
        try:
            if not isinstance(data, dict):
                raise TypeError(f"expected a JSON object, got {type(data).__name__}")
            if data.get("version") != LC_FORMAT_VERSION:
                raise ValueError(f"LC format version {data.get('version')!r} is not supported")
            missing = [key for key in ("num_layers", "token_types", "sample_ids", "per_sample") if key not in data]
            if missing:
                raise KeyError(", ".join(missing))
            return cls(
                num_layers=int(data["num_layers"]),
                token_types=tuple(data["token_types"]),
                sample_ids=list(data["sample_ids"]),
                per_sample={key: [list(map(float, row)) for row in rows] for key, rows in data["per_sample"].items()},
                model_id=data.get("model_id"),
                metadata=dict(data.get("metadata") or {}),
                weights=recorded_fingerprint(data.get("weights"), "weights"),
            )
        except KeyError as error:
            raise ValueError(f"{path}: not an LC file from shortv calibrate (missing {error.args[0]})") from None
        except (TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"{path}: not an LC file from shortv calibrate: {error}") from None


def divergence_between(log_variant: torch.Tensor, log_original: torch.Tensor, kind: str) -> torch.Tensor:
    """Divergence per row of two log-distributions over the vocabulary (last dim), in fp32.

    KL and JS are >= 0, but summed in fp32 over a vocabulary two nearly equal distributions can give about -1e-7;
    such rounding is clamped to 0, so an LC is never negative.
    """
    log_variant, log_original = log_variant.float(), log_original.float()
    if kind == "kl":  # KL(P_variant || P_original), the paper's code: kl_div(log P_original, P_variant)
        return (log_variant.exp() * (log_variant - log_original)).sum(-1).clamp_min(0.0)
    if kind == "kl_reversed":
        return (log_original.exp() * (log_original - log_variant)).sum(-1).clamp_min(0.0)
    if kind == "js":
        log_mix = torch.logaddexp(log_variant, log_original) - math.log(2.0)
        return 0.5 * (divergence_between(log_variant, log_mix, "kl") + divergence_between(log_original, log_mix, "kl"))
    raise ValueError(f"unknown divergence {kind!r}; choose one of {DIVERGENCES}")


def _repeat_batch(value: Any, copies: int, device: torch.device) -> Any:
    """Call arguments for a batch of ``copies`` variants of one sample: batch-1 tensors are expanded."""
    if isinstance(value, torch.Tensor):
        value = value.to(device)
        return value.expand(copies, *value.shape[1:]) if value.dim() > 0 and value.shape[0] == 1 else value
    if isinstance(value, tuple):
        return tuple(_repeat_batch(item, copies, device) for item in value)
    return value


class _Scorer:
    """Final norm + LM head at the scored positions (and the logit soft-capping of Gemma-style models, as their
    forward applies it), to log-probabilities in fp32."""

    def __init__(self, model: nn.Module):
        self.norm = find_final_norm(model)
        self.head = model.get_output_embeddings()
        if self.head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings (LM head) to score with")
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def __call__(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = hidden[:, positions].to(execution_device(self.norm))
        logits = self.head(self.norm(hidden).to(execution_device(self.head)))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return torch.log_softmax(logits.float(), dim=-1)


@dataclass
class _Capture:
    inputs: list[tuple[torch.Tensor, dict[str, Any]]] = field(default_factory=list)
    last_output: torch.Tensor | None = None
    #: Between-layer updates (registry `inter_layer_update`, e.g. DeepStack): after layer i, the calls' extra
    #: arguments, and layer i's own output (which differs from layer i+1's input by those updates).
    updates: dict[int, list[tuple[tuple, dict[str, Any]]]] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    update: Any = None  # the (unpatched) bound update method

    def apply_updates(self, layer: int, states: torch.Tensor) -> torch.Tensor:
        """``states`` (any number of variants of the sample) after the updates the model made after ``layer``."""
        for args, kwargs in self.updates.get(layer, ()):
            states = torch.cat([self.update(states[row : row + 1], *args, **kwargs) for row in range(len(states))])
        return states


@contextmanager
def _recording_updates(model: nn.Module, capture: _Capture) -> Iterator[None]:
    """Record every call of the family's between-layer update, with the index of the layer it follows."""
    found = find_inter_layer_update(model)
    if found is None:
        yield
        return
    owner, name = found
    capture.update = getattr(owner, name)
    previous = owner.__dict__.get(name)

    def recording(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        after = len(capture.inputs) - 1
        capture.updates.setdefault(after, []).append((args, kwargs))
        capture.outputs.setdefault(after, hidden_states)
        return capture.update(hidden_states, *args, **kwargs)

    object.__setattr__(owner, name, recording)
    try:
        yield
    finally:
        if previous is None:
            object.__delattr__(owner, name)
        else:
            object.__setattr__(owner, name, previous)


def _capture_pass(model: nn.Module, layers: nn.ModuleList, sample: CalibrationSample) -> _Capture:
    capture = _Capture()

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = {key: value for key, value in kwargs.items() if key != "hidden_states"}
        if len(args) > 1:  # positional arguments after the hidden states (Gemma 4's per-layer input), by name
            rest.update(zip(list(inspect.signature(module.forward).parameters)[1:], args[1:]))
        capture.inputs.append((hidden, rest))

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        capture.last_output = output[0] if isinstance(output, tuple) else output

    handles = [layer.register_forward_pre_hook(before, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(after, with_kwargs=True))
    try:
        with _recording_updates(model, capture):
            model(**inputs_for(model, sample.inputs), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if len(capture.inputs) != len(layers) or capture.last_output is None:
        raise RuntimeError(f"expected {len(layers)} decoder layer calls in one forward, saw {len(capture.inputs)}")
    capture.last_output = capture.apply_updates(len(layers) - 1, capture.last_output)
    return capture


def _sample_visual_mask(model: nn.Module, sample: CalibrationSample, seq: int) -> torch.Tensor:
    if sample.visual_mask is not None:
        mask = sample.visual_mask.bool()
    else:
        input_ids = sample.inputs.get("input_ids")
        ids = visual_token_ids(model)
        if input_ids is None or not ids:
            raise ValueError(
                f"sample {sample.id!r}: cannot tell which tokens are visual; give the sample a `visual_mask`"
            )
        mask = torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))
    if tuple(mask.shape) != (1, seq):
        raise ValueError(f"sample {sample.id!r}: visual mask has shape {tuple(mask.shape)}, expected (1, {seq})")
    if not bool(mask.any()):
        raise ValueError(f"sample {sample.id!r} has no visual token: LC is undefined without an image")
    return mask


class _Replay:
    """Runs a batch of variants through layers ``start..L-1`` with the captured call arguments."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, capture: _Capture, targets: torch.Tensor):
        self.layers = layers
        self.capture = capture
        last = layers[-1]
        # The last layer only needs the scored queries: reuse the fast frozen layer with "frozen" = everything else.
        self.fast = fast_layer_for(model)
        self.last_layer_shortcut = self.fast is not None and self.fast.unsupported_reason(last) is None
        seq = capture.inputs[0][0].shape[1]
        keep = torch.ones(1, seq, dtype=torch.bool)
        keep[0, targets.cpu()] = False
        self.last_layout = TokenLayout.from_visual_mask(keep)
        self.layer_evaluations = 0
        # Stores written by one layer and read by later ones: their content after the capture pass.
        self.stores = [(store, dict(store)) for store in {id(v): v for _, kwargs in capture.inputs
                                                          for v in kwargs.values() if _is_store(v)}.values()]

    def start_batch(self) -> None:
        """A new batch of variants: every store holds the capture pass's content again."""
        for store, content in self.stores:
            store.clear()
            store.update(content)

    def _fill_stores(self, rows: int) -> None:
        """Rows that joined the batch after a store was written read what the capture pass wrote there."""
        for store, content in self.stores:
            for key, tensors in list(store.items()):
                missing = rows - tensors[0].shape[0]
                if missing > 0:
                    store[key] = tuple(torch.cat([t, c.to(t.device).expand(missing, *c.shape[1:])])
                                       for t, c in zip(tensors, content[key]))

    def run_layer(self, index: int, states: torch.Tensor, whole: bool = False) -> torch.Tensor:
        """Layer ``index`` on a batch of variants (``whole``: every position, never the last layer's shortcut)."""
        layer = self.layers[index]
        device = execution_device(layer)
        kwargs = {key: _repeat_batch(value, states.shape[0], device) for key, value in self.capture.inputs[index][1].items()}
        states = states.to(device)
        self.layer_evaluations += states.shape[0]
        self._fill_stores(states.shape[0])
        if index == len(self.layers) - 1 and self.last_layer_shortcut and not whole:
            layout = TokenLayout.from_visual_mask(self.last_layout.visual.expand(states.shape[0], -1).to(device))
            return self.capture.apply_updates(index, self.fast.fast_frozen_forward(layer, layout, states, **kwargs))
        output = layer(states, **kwargs)
        return self.capture.apply_updates(index, output[0] if isinstance(output, tuple) else output)


def _is_store(value: Any) -> bool:
    """A mutable mapping of per-key tuples of batch-first tensors, shared by the layers' calls."""
    return isinstance(value, MutableMapping) and all(
        isinstance(item, tuple) and item and all(isinstance(t, torch.Tensor) for t in item) for item in value.values()
    )


def _variant_start_states(capture: _Capture, masks: dict[str, torch.Tensor]) -> list[tuple[str, int, torch.Tensor]]:
    """(token type, layer, state after layer) for every variant; freezing at layer l costs no layer evaluation."""
    num_layers = len(capture.inputs)
    variants = []
    for layer in range(num_layers):
        layer_input = capture.inputs[layer][0]
        if layer in capture.outputs:  # a between-layer update follows: mix the layer's own output, then update
            layer_output = capture.outputs[layer]
        else:
            layer_output = capture.inputs[layer + 1][0] if layer + 1 < num_layers else capture.last_output
        for token_type, mask in masks.items():
            frozen = mask.to(layer_input.device).unsqueeze(-1)
            state = torch.where(frozen, layer_input, layer_output.to(layer_input.device))
            variants.append((token_type, layer, capture.apply_updates(layer, state)))
    return variants


def _operator_start_states(
    model: nn.Module, replay: _Replay, visual: torch.Tensor, token_types: Sequence[str]
) -> list[tuple[str, int, torch.Tensor]]:
    """(token type, layer, state after layer) for every per-operator variant: layer ``l`` runs once on its captured
    input, one batch row per operator, each row with its operator's update removed at the visual positions."""
    variants = []
    if not token_types:
        return variants
    rows = len(token_types)
    for index, layer in enumerate(replay.layers):
        anatomy = layer_anatomy(model, layer)
        hooks = []
        for row, token_type in enumerate(token_types):
            mask = torch.zeros(rows, visual.shape[1], dtype=torch.bool, device=visual.device)
            mask[row] = visual[0]
            hook = ZeroRows(mask)
            hooks += [module.register_forward_hook(hook, prepend=True)
                      for module in operator_modules(layer, anatomy, OPERATOR_TOKEN_TYPES[token_type])]
        replay.start_batch()
        layer_input = replay.capture.inputs[index][0]
        try:
            states = replay.run_layer(index, layer_input.expand(rows, *layer_input.shape[1:]), whole=True)
        finally:
            for handle in hooks:
                handle.remove()
        variants += [(token_type, index, states[row : row + 1]) for row, token_type in enumerate(token_types)]
    return variants


@torch.no_grad()
def sample_contribution(
    model: nn.Module,
    sample: CalibrationSample,
    token_types: Sequence[str] = TOKEN_TYPES,
    divergence: str = "kl",
    max_variants_per_batch: int = 16,
) -> tuple[dict[str, list[float]], int]:
    """LC of every layer for one sample, per token type; also returns the number of layer evaluations."""
    layers = find_decoder_layers(model)
    scorer = _Scorer(model)
    capture = _capture_pass(model, layers, sample)
    seq = capture.inputs[0][0].shape[1]
    visual = _sample_visual_mask(model, sample, seq)
    masks = {"visual": visual, "text": ~visual}
    masks = {token_type: masks[token_type] for token_type in token_types if token_type in masks}
    targets = torch.tensor(sample.target_positions if sample.target_positions is not None else (seq - 1,))
    if bool(((targets < 0) | (targets >= seq)).any()):
        raise ValueError(f"sample {sample.id!r}: target positions {targets.tolist()} outside 0..{seq - 1}")
    reference = scorer(capture.last_output, targets)

    replay = _Replay(model, layers, capture, targets)
    operators = [token_type for token_type in token_types if token_type in OPERATOR_TOKEN_TYPES]
    variants = _variant_start_states(capture, masks) + _operator_start_states(model, replay, visual, operators)
    variants.sort(key=lambda variant: variant[1])  # by layer: a batch of variants starts at its first one's layer
    num_layers = len(layers)
    result = {token_type: [0.0] * num_layers for token_type in token_types}
    for start in range(0, len(variants), max_variants_per_batch):
        chunk = variants[start : start + max_variants_per_batch]
        replay.start_batch()
        # Wavefront: a variant frozen at layer l joins the batch at layer l+1.
        active: list[tuple[str, int]] = []
        states: torch.Tensor | None = None
        for index in range(chunk[0][1] + 1, num_layers + 1):
            joining = [(token_type, layer, state) for token_type, layer, state in chunk if layer == index - 1]
            if joining:
                new = torch.cat([state for _, _, state in joining])
                states = new if states is None else torch.cat([states.to(new.device), new])
                active += [(token_type, layer) for token_type, layer, _ in joining]
            if index < num_layers:
                states = replay.run_layer(index, states)
        # Scored one variant at a time, with the same shapes as the reference, so that equal states give exactly 0.
        for row, (token_type, layer) in enumerate(active):
            score = divergence_between(scorer(states[row : row + 1], targets), reference, divergence)
            result[token_type][layer] = score.mean().item()
    _check_finite(sample, result)
    return result, num_layers + replay.layer_evaluations


def _check_finite(sample: CalibrationSample, lc: dict[str, list[float]]) -> None:
    """Stop at the first sample whose LC is NaN or inf: a mean over it, and a ranking of it, would mean nothing."""
    problems = []
    for token_type, values in lc.items():
        layers = [layer for layer, value in enumerate(values) if not math.isfinite(value)]
        if layers:
            problems.append(f"{token_type} LC of layer(s) {layers}")
    if problems:
        raise ValueError(
            f"sample {sample.id!r}: Layer Contribution is not finite ({'; '.join(problems)}): the model's output is "
            "NaN or inf on this sample (in half precision, try --dtype fp32). Nothing was recorded for it."
        )


def _run_metadata(model: nn.Module, token_types: Sequence[str], divergence: str, extra: Mapping[str, Any]) -> dict:
    import transformers

    return {
        "divergence": divergence,
        "token_types": list(token_types),
        "num_layers": len(find_decoder_layers(model)),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "transformers": transformers.__version__,
        **extra,
    }


def layer_contribution(
    model: nn.Module,
    samples: Iterable[CalibrationSample],
    token_types: Sequence[str] = TOKEN_TYPES,
    divergence: str = "kl",
    model_id: str | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    max_variants_per_batch: int = 16,
    metadata: Mapping[str, Any] | None = None,
    weights: WeightsFingerprint | None = None,
) -> LCResult:
    """LC per layer for ``token_types`` over ``samples``, averaged.

    With ``out_dir``, every finished sample is appended to ``lc_samples.jsonl`` at once; ``resume=True`` skips the
    samples already there, so an interrupted calibration continues and ends with the same result, and refuses
    other weights than the interrupted run's. ``weights``: the model's identity (`shortv.fingerprint`), recorded in
    the run and the result; default: the fingerprint of the model's tensors in memory.
    """
    token_types = tuple(token_types)
    unknown = [token_type for token_type in token_types if token_type not in ALL_TOKEN_TYPES]
    if unknown or not token_types:
        raise ValueError(f"token_types must be a non-empty subset of {ALL_TOKEN_TYPES}, got {token_types}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    run = _run_metadata(model, token_types, divergence, {"model_id": model_id, **(metadata or {})})
    weights = fingerprint_model(model) if weights is None else weights

    samples = list(samples) if not isinstance(samples, Sequence) else samples
    # A lazy sequence (shortv.data.CalibrationSamples) knows its ids without building inputs.
    sample_ids = list(getattr(samples, "ids", None) or [sample.id for sample in samples])
    if len(set(sample_ids)) != len(sample_ids):
        raise ValueError("calibration sample ids must be unique")
    if not samples:
        raise ValueError("no calibration samples")

    finished: dict[str, dict[str, list[float]]] = {}
    records_path = None
    with ExitStack() as stack:
        if out_dir is not None:  # one run per folder; finished samples (of any process) are skipped on resume
            out_dir = stack.enter_context(main_holds(exclusive_output, out_dir))
            records = on_main(start_run, out_dir, SAMPLES_FILE, RUN_FILE, run, resume, weights=weights)
            finished = {key: record["lc"] for key, record in records.items()}
            records_path = shard_path(out_dir, SAMPLES_FILE, process_index())
        if get_shortv_state(model) is not None:  # calibrate the unmodified model
            stack.enter_context(disable_shortv(model))
        bar = stack.enter_context(tqdm(total=len(samples), desc="LC calibration", unit="sample",
                                       disable=not progress or not is_main_process()))
        bar.update(sum(1 for sample_id in sample_ids if sample_id in finished))

        def calibrate_part(indices: Sequence[int]) -> list[tuple[str, dict[str, list[float]], int]]:
            """This process's samples, each recorded as soon as it is done."""
            done = []
            for index in indices:
                sample = samples[index]
                lc, count = sample_contribution(model, sample, token_types, divergence, max_variants_per_batch)
                if records_path is not None:
                    append_records(records_path, [{"id": sample.id, "lc": lc}])
                done.append((sample.id, lc, count))
                bar.update(1)
            return done

        todo = [index for index, sample_id in enumerate(sample_ids) if sample_id not in finished]
        computed = share(todo, calibrate_part)  # several processes: each computes its part, all get every result
        finished.update((sample_id, lc) for sample_id, lc, _ in computed)
        bar.update(len(sample_ids) - bar.n)  # the other processes' samples
        if records_path is not None and is_main_process():
            merged = [{"id": sample_id, "lc": finished[sample_id]} for sample_id in sample_ids]
            merge_shards(out_dir, SAMPLES_FILE, merged)
    per_sample = {token_type: [finished[sample_id][token_type] for sample_id in sample_ids] for token_type in token_types}
    return LCResult(
        num_layers=run["num_layers"],
        token_types=token_types,
        sample_ids=sample_ids,
        per_sample=per_sample,
        model_id=model_id,
        metadata={**run, "num_samples": len(sample_ids), "processes": process_count(),
                  "layer_evaluations_this_run": sum(count for _, _, count in computed)},
        weights=weights,
    )
