"""Load a model and its processor by local path or hub id; the embedded tiny LLaVA when none is given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .placement import execution_device, parameter_dtype

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(
    model: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any, str]:
    """(model in eval mode, processor, model id). ``None`` loads the embedded tiny model shipped with shortv."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if model is None:
        from .tiny import embedded_model_path

        model = embedded_model_path()
    source = str(model)
    local = Path(source).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise FileNotFoundError(f"{local} is not a model folder (no config.json)")
    if not local.exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise FileNotFoundError(f"model not found: {source!r} is neither a local folder nor a hub id (owner/name)")
    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation}
    if dtype is not None:
        kwargs["dtype"] = parse_dtype(dtype)
    if device_map is not None:
        kwargs["device_map"] = device_map
    path = local if local.exists() else source
    loaded = AutoModelForImageTextToText.from_pretrained(path, **kwargs).eval()
    processor = AutoProcessor.from_pretrained(path)
    return loaded, processor, source


def inputs_for(model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """Processor outputs moved to the model's input device, floating tensors (pixels) cast to its dtype."""
    embeddings = model.get_input_embeddings()
    device, dtype = execution_device(embeddings), parameter_dtype(embeddings)
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        moved[key] = value
    return moved
