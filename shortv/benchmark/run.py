"""Entry points: benchmark a paper shape (random weights, real dims), a local checkpoint, or the embedded tiny LLaVA.

Each one builds a model and `BenchInputs`, picks the ShortV layers (`layers.py`) and hands them to
`timing.benchmark`. ``shortv bench`` calls these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..flops import get_shape
from . import shapes
from ..placement import available_device as resolve_device
from .devices import dtype_name, resolve_dtype
from .inputs import DEFAULT_PROMPT, causal_lm_inputs, multimodal_inputs
from ..registry import find_decoder_layers
from .layers import choose_config, given_note, shape_shortv_config, with_method
from .report import SMALL_MODEL_CAVEAT
from .results import BenchResult
from .timing import Progress, benchmark


def bench_shape(
    name: str,
    *,
    num_layers: int | None = None,
    n: int | None = None,
    config: Any = None,
    proportional: bool = False,
    visual_tokens: int | None = None,
    text_tokens: int = 64,
    batch_size: int = 1,
    new_tokens: int = 16,
    repeats: int = 5,
    warmup: int = 1,
    dtype: str | torch.dtype = "bf16",
    device: str | torch.device = "cpu",
    seed: int = 0,
    threads: int | None = None,
    progress: Progress | None = None,
    method: str | None = None,
    k: int | None = None,
    ratio: float | None = None,
    rank: str | None = None,
) -> BenchResult:
    """Shape mode: a random-weight causal LM with a paper model's real dims (its first ``num_layers`` layers),
    ``batch_size`` prompts of ``text_tokens`` text tokens around one block of ``visual_tokens`` image tokens, and
    an explicit visual mask. ``visual_tokens`` defaults to the shape's own count (576 for
    LLaVA-1.5 and the Qwen2-VL shape, 2880 for LLaVA-NeXT's AnyRes grid). ``config`` overrides the layer selection
    of `shape_shortv_config`. ``method`` (with ``k``/``ratio``/``rank``): measure that method instead of ShortV
    (`layers.with_method`); the shape's explicit visual mask serves every method."""
    full = get_shape(name).dims.num_layers
    given = config is not None
    if config is None:
        config, selection = shape_shortv_config(name, num_layers, n, proportional)
    else:
        selection = given_note(config)
    config, selection = with_method(config, selection, num_layers or full, method, k, ratio, rank, given)
    say = progress or (lambda message: None)
    say(f"building {name} shape model ({num_layers or full} of {full} layers, {dtype_name(resolve_dtype(dtype))})")
    model = shapes.build_shape_model(
        name, num_layers=num_layers, dtype=resolve_dtype(dtype), seed=seed, device=resolve_device(device),
        progress=progress is not None,
    )
    if visual_tokens is None:
        visual_tokens = get_shape(name).visual_tokens
    inputs = causal_lm_inputs(batch_size, text_tokens, visual_tokens, model.config.vocab_size, seed)
    label = f"{name} (shape{'' if num_layers in (None, full) else f', first {num_layers} layers'})"
    return benchmark(
        model, inputs, config, new_tokens=new_tokens, repeats=repeats, warmup=warmup, name=label, source="shape",
        full_num_layers=full, layer_selection=selection, threads=threads, progress=progress,
    )


def bench_pretrained(
    path: str | Path,
    *,
    config: Any = None,
    n: int | None = None,
    visual_tokens: int | None = None,
    text_tokens: int = 64,
    batch_size: int = 1,
    new_tokens: int = 16,
    repeats: int = 5,
    warmup: int = 1,
    dtype: str | torch.dtype = "bf16",
    device: str | torch.device = "cpu",
    prompt: str = DEFAULT_PROMPT,
    threads: int | None = None,
    progress: Progress | None = None,
    trust_remote_code: bool = False,
    method: str | None = None,
    k: int | None = None,
    ratio: float | None = None,
    rank: str | None = None,
) -> BenchResult:
    """A local checkpoint folder, loaded and checked as every command loads one (`shortv.loading.load_model`).
    Multimodal models (``AutoModelForImageTextToText``) get a synthetic image and ``prompt`` through their
    processor, which sets the token counts; a bare causal LM gets ``text_tokens`` random text ids around a block of
    ``visual_tokens`` (default 576) ids declared visual with an explicit mask."""
    from ..loading import load_model, resolve_model

    torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
    path = str(path)
    source = resolve_model(path, trust_remote_code)
    if source.is_multimodal:
        if visual_tokens is not None:
            raise ValueError(
                f"{path} is a multimodal model: its processor decides how many visual tokens an image becomes, so "
                "visual_tokens (--visual-tokens) applies only to a bare causal LM or to shape mode"
            )
        model, processor, _ = load_model(source, dtype=torch_dtype)
        inputs = multimodal_inputs(model, processor, batch_size, prompt)
    else:
        model, _, _ = load_model(source, dtype=torch_dtype, multimodal=False)
        vocab = model.config.get_text_config().vocab_size
        visual_tokens = 576 if visual_tokens is None else visual_tokens
        inputs = causal_lm_inputs(batch_size, text_tokens, visual_tokens, vocab)
    model = model.to(torch_device).eval()
    given = config is not None
    config, selection = choose_config(model, config, n, Path(path))
    config, selection = with_method(config, selection, source.num_layers, method, k, ratio, rank, given)
    return benchmark(
        model, inputs, config, new_tokens=new_tokens, repeats=repeats, warmup=warmup, name=path,
        source="pretrained", layer_selection=selection, threads=threads, progress=progress,
    )


def load_embedded_model() -> tuple[nn.Module, Any]:
    """The embedded tiny LLaVA and its processor (`shortv.tiny.load_embedded`), with a clear error if missing."""
    try:
        from ..tiny import load_embedded
    except ImportError as error:
        raise RuntimeError(
            f"the embedded tiny model (shortv.tiny.load_embedded) is not available in this install: {error}. "
            "Pass --model PATH or --shape NAME instead."
        ) from error
    try:
        return load_embedded()
    except (OSError, FileNotFoundError) as error:
        raise RuntimeError(
            f"the embedded tiny model could not be loaded: {error}. Pass --model PATH or --shape NAME instead."
        ) from error


def bench_embedded(
    *,
    config: Any = None,
    n: int | None = None,
    batch_size: int = 1,
    new_tokens: int = 16,
    repeats: int = 5,
    warmup: int = 1,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    prompt: str = DEFAULT_PROMPT,
    threads: int | None = None,
    progress: Progress | None = None,
    method: str | None = None,
    k: int | None = None,
    ratio: float | None = None,
    rank: str | None = None,
) -> BenchResult:
    """The embedded tiny LLaVA with a synthetic image."""
    from ..tiny import embedded_model_path

    torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
    model, processor = load_embedded_model()
    model = model.to(device=torch_device, dtype=torch_dtype).eval()
    inputs = multimodal_inputs(model, processor, batch_size, prompt)
    given = config is not None
    config, selection = choose_config(model, config, n, embedded_model_path())
    config, selection = with_method(config, selection, len(find_decoder_layers(model)), method, k, ratio, rank,
                                    given)
    return benchmark(
        model, inputs, config, new_tokens=new_tokens, repeats=repeats, warmup=warmup, name="embedded tiny LLaVA",
        source="embedded", layer_selection=selection, notes=[SMALL_MODEL_CAVEAT], threads=threads, progress=progress,
    )
