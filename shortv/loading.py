"""Load a model and its processor by local path or hub id; the embedded tiny LLaVA when none is given.

Two steps, so that everything checkable is checked before the weights load: `resolve_model` reads only the model's
``config.json`` (layer count, context length, a stable model id), `load_model` loads weights and processor. Code
shipped inside a model folder never runs unless the caller opts in with ``trust_remote_code=True``.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .fingerprint import WeightsFingerprint, fingerprint_folder, fingerprint_hub
from .placement import check_device_map, execution_device, parameter_dtype

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class ModelSource:
    """A model to load, known from its config alone."""

    #: What ``from_pretrained`` gets: a local folder or a hub id.
    location: str | Path
    #: Stable name: the resolved absolute folder (the same for ``./m`` and ``/abs/m``), or the hub id.
    model_id: str
    config: Any
    trust_remote_code: bool = False
    _fingerprint: WeightsFingerprint | None = field(default=None, repr=False)

    @property
    def fingerprint(self) -> WeightsFingerprint:
        """The weights' identity (`shortv.fingerprint`): the files of a local folder, the commit of a hub snapshot.
        Read once, on first use."""
        if self._fingerprint is None:
            local = isinstance(self.location, Path)
            self._fingerprint = fingerprint_folder(self.location) if local else fingerprint_hub(str(self.location))
        return self._fingerprint

    @property
    def is_multimodal(self) -> bool:
        """Whether transformers loads it as an image-text-to-text model (else: a causal LM, e.g. a bare LLM)."""
        from transformers import AutoModelForImageTextToText

        try:
            return type(self.config) in AutoModelForImageTextToText._model_mapping
        except Exception:  # noqa: BLE001 - lazy mapping lookups can raise for unknown configs
            return False

    @property
    def num_layers(self) -> int:
        """Decoder layers of the language model (``num_hidden_layers`` of the text config)."""
        return int(self.config.get_text_config().num_hidden_layers)

    @property
    def context_length(self) -> int | None:
        return context_length(self.config)


def context_length(config: Any) -> int | None:
    """The longest input the language model is made for (``max_position_embeddings``), or None when not declared."""
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    return int(limit) if limit else None


def model_id_of(model: Any) -> str | None:
    """The id a loaded model came from (``config.name_or_path``): a local folder resolved to its absolute path, as
    `resolve_model` names it, so that files recorded for it match however the path was written."""
    name = str(getattr(model.config, "name_or_path", "") or "")
    if not name:
        return None
    local = Path(name).expanduser()
    return str(local.resolve()) if local.exists() else name


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def resolve_model(model: str | Path | None = None, trust_remote_code: bool = False) -> ModelSource:
    """Read ``model``'s config (``None``: the embedded tiny model). Clear errors for a missing folder or id."""
    from transformers import AutoConfig

    if model is None:
        from .tiny import embedded_model_path

        model = embedded_model_path()
    source = str(model)
    local = Path(source).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise FileNotFoundError(f"{local} is not a model folder (no config.json)")
    if not local.exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise FileNotFoundError(f"model not found: {source!r} is neither a local folder nor a hub id (owner/name)")
    location: str | Path = local if local.exists() else source
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as error:  # bad JSON, unknown model_type, custom code...
        if "trust_remote_code" in str(error):
            raise ValueError(
                f"{location} contains custom code (auto_map in its config.json), which shortv does not run unless "
                "you pass --trust-remote-code (trust_remote_code=True); do so only for a source you trust"
            ) from None
        where = local / "config.json" if local.exists() else source
        raise ValueError(f"{where}: cannot read the model config: {_first_line(error)}") from None
    model_id = str(local.resolve()) if local.exists() else source
    return ModelSource(location, model_id, config, trust_remote_code)


def _check_weight_files(folder: Path) -> None:
    """Read every safetensors header, so a truncated or corrupt file is named before loading starts."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError for any bad file
            raise ValueError(f"{path}: not a valid safetensors file ({_first_line(error)}); "
                             "re-download or re-save the model") from None


def load_model(
    model: str | Path | ModelSource | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    multimodal: bool = True,
) -> tuple[Any, Any, str]:
    """(model in eval mode, processor, model id). ``None`` loads the embedded tiny model shipped with shortv.

    ``trust_remote_code=True`` lets a model folder or hub repo run its own Python code; only for sources you trust.
    ``multimodal=False`` loads a causal LM (``AutoModelForCausalLM``, e.g. a bare LLM) and no processor (None).
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    source = model if isinstance(model, ModelSource) else resolve_model(model, trust_remote_code)
    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation,
                              "trust_remote_code": source.trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = parse_dtype(dtype)
    if device_map is not None:
        check_device_map(device_map)
        kwargs["device_map"] = device_map
    folder = Path(source.location) if isinstance(source.location, Path) else None
    if folder is not None:
        _check_weight_files(folder)
    try:
        auto_class = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
        loaded = auto_class.from_pretrained(source.location, **kwargs).eval()
        processor = (AutoProcessor.from_pretrained(source.location, trust_remote_code=source.trust_remote_code)
                     if multimodal else None)
    except (pickle.UnpicklingError, EOFError) as error:
        weights = sorted(folder.glob("*.bin")) if folder is not None else []
        where = ", ".join(map(str, weights)) or str(source.location)
        raise ValueError(f"{where}: not a loadable PyTorch checkpoint ({_first_line(error)})") from None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise ValueError(f"{source.location}: cannot load the model: {_first_line(error)}") from None
    return loaded, processor, source.model_id


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
