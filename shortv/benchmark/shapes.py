"""Random-weight causal LMs with the real dimensions of the paper's models, and their token layouts.

Timing and memory depend on tensor shapes, not weight values, so benchmarks
can run at full scale without downloading checkpoints. The visual encoder is
left out: ShortV only changes the language decoder.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import torch
from accelerate import init_empty_weights
from tqdm.auto import tqdm
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3_5ForCausalLM,
    Qwen3_5TextConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from ..flops import LayerDims, PaperShape, get_shape


class _Family(NamedTuple):
    """How to build the language model of a `shortv.flops.PaperShape` family: its config and model classes, and
    the settings of the original checkpoints that are not dimensions."""

    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    settings: dict[str, Any]
    #: Whether the config takes ``head_dim`` (Qwen2 derives it from hidden size and heads).
    takes_head_dim: bool = True


#: One row per ``PaperShape.family``; a new family is one row here plus its shape in `shortv.flops`.
FAMILIES: dict[str, _Family] = {
    # Vicuna-v1.5 (LLaVA-1.5 / LLaVA-NeXT vicuna).
    "llama": _Family(LlamaConfig, LlamaForCausalLM, dict(
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
    )),
    # Qwen2-VL's LM; its multimodal RoPE is replaced by 1-D RoPE, which costs the same.
    "qwen2": _Family(Qwen2Config, Qwen2ForCausalLM, dict(
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    ), takes_head_dim=False),
    # Qwen3-VL's LM (QK-norm), likewise with 1-D RoPE.
    "qwen3": _Family(Qwen3Config, Qwen3ForCausalLM, dict(
        max_position_embeddings=262144, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5e6},
    )),
    # Gemma 3's LM: sandwich norms, QK-norm, 5 sliding (1024) : 1 global layers, global RoPE linearly scaled by 8.
    "gemma3": _Family(Gemma3TextConfig, Gemma3ForCausalLM, dict(
        max_position_embeddings=131072, rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=1024,
        tie_word_embeddings=True,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
    )),
    # Qwen3.5 / 3.6's LM: hybrid Gated DeltaNet / full attention (layer kinds and linear-attention dims from the
    # shape's per-layer dims), output-gated QK-normed attention with partial (1/4) interleaved M-RoPE, 1-D positions.
    # The checkpoints' embeddings are untied; tied here, which saves 5 GB of RAM (fp32) and costs the same: prefill
    # computes the LM head for one position per sample either way.
    "qwen3_5": _Family(Qwen3_5TextConfig, Qwen3_5ForCausalLM, dict(
        max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                         "mrope_section": [11, 11, 10], "mrope_interleaved": True},
    )),
}


class ShapeInputs(NamedTuple):
    """A batch of token ids and where the image tokens sit in each row."""

    input_ids: torch.Tensor
    visual_mask: torch.Tensor


def as_shape(shape: str | PaperShape) -> PaperShape:
    """A registered paper shape by name (`shortv.flops.get_shape`), or a `PaperShape` built by the caller."""
    return shape if isinstance(shape, PaperShape) else get_shape(shape)


def miniature(shape: str | PaperShape, num_layers: int = 4, visual_tokens: int | None = None) -> PaperShape:
    """A few-MB model of ``shape``'s family and attention layout (multi-head or grouped-query): hidden size 64,
    ``num_layers`` layers, ``visual_tokens`` (default: a 24th of the shape's). For checking the pieces fit (the GPU
    check's ``--smoke``) and for measuring host time, where the layers' arithmetic should cost next to nothing."""
    shape = as_shape(shape)
    dims = shape.dims
    grouped = dims.num_key_value_heads < dims.num_attention_heads
    small = LayerDims(hidden_size=64, intermediate_size=64 * dims.intermediate_size // dims.hidden_size,
                      num_attention_heads=4, num_key_value_heads=1 if grouped else 4, head_dim=16,
                      num_layers=num_layers, vocab_size=512)
    visual = shape.visual_tokens // 24 if visual_tokens is None else visual_tokens
    return dataclasses.replace(shape, dims=small, visual_tokens=visual)


def shape_config(name: str | PaperShape, num_layers: int | None = None) -> PretrainedConfig:
    """The HF config of a paper shape, optionally truncated to its first layers."""
    shape = as_shape(name)
    dims = shape.dims
    if num_layers is None:
        num_layers = dims.num_layers
    if not 1 <= num_layers <= dims.num_layers:
        raise ValueError(
            f"num_layers for {name!r} must be in 1..{dims.num_layers}, got {num_layers}"
        )
    family = FAMILIES[shape.family]
    extra = {"head_dim": dims.head_dim} if family.takes_head_dim else {}
    if dims.layers:
        extra.update(_layer_kinds(dims, num_layers))
    return family.config_class(
        vocab_size=dims.vocab_size,
        hidden_size=dims.hidden_size,
        intermediate_size=dims.intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=dims.num_attention_heads,
        num_key_value_heads=dims.num_key_value_heads,
        **{"tie_word_embeddings": False, **extra, **family.settings},
    )


def _layer_kinds(dims: Any, num_layers: int) -> dict[str, Any]:
    """Config settings of a hybrid shape's first ``num_layers`` layers: ``layer_types`` and linear-attention dims."""
    kinds = ["linear_attention" if kind == "linear_attention" else "full_attention" for kind in dims.layer_kinds]
    linear = next((dims.layer(i).linear for i in range(dims.num_layers) if dims.layer(i).linear), None)
    settings: dict[str, Any] = {"layer_types": kinds[:num_layers]}
    if linear is not None:
        settings.update(linear_num_key_heads=linear.key_heads, linear_num_value_heads=linear.value_heads,
                        linear_key_head_dim=linear.key_head_dim, linear_value_head_dim=linear.value_head_dim,
                        linear_conv_kernel_dim=linear.conv_kernel)
    return settings


def _random_parameter(
    name: str, like: torch.Tensor, std: float, generator: torch.Generator
) -> torch.nn.Parameter:
    """Matrices ~ N(0, std); norm scales 1 and biases 0 so activations stay O(1)."""
    data = torch.empty(like.shape, dtype=like.dtype, device=generator.device)
    if data.ndim >= 2:
        data.normal_(0.0, std, generator=generator)
    elif name == "bias":
        data.zero_()
    else:
        data.fill_(1.0)
    # requires_grad=True, as from_pretrained leaves parameters: PyTorch picks matmul paths by this flag. With a
    # frozen LM head, the last-position slice generate() feeds it (logits_to_keep=1) is not folded into a 2-D
    # matmul but run as a bmm that first copies the whole transposed weight: +1.3 s per prefill for a 7B model on
    # CPU, in every variant, which would distort benchmarks. Inference under no_grad/inference_mode is unaffected.
    return torch.nn.Parameter(data, requires_grad=True)


def _materialize(model: torch.nn.Module, std: float, seed: int, device: torch.device, progress: bool = False) -> None:
    """Replace meta parameters in place, one tensor at a time on ``device``, keeping ties shared; ``progress``
    shows a bar over the parameters (minutes for a 7B model on a CPU)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    done: dict[int, torch.nn.Parameter] = {}
    total = sum(param.numel() for param in model.parameters())
    with tqdm(total=total, desc="building the model", unit="param", unit_scale=True, disable=not progress) as bar:
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if id(param) not in done:
                    done[id(param)] = _random_parameter(name, param, std, generator)
                    bar.update(param.numel())
                module._parameters[name] = done[id(param)]


def build_shape_model(
    name: str | PaperShape,
    num_layers: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> PreTrainedModel:
    """An eval-mode causal LM with random weights and ``name``'s real dimensions, on ``device``.

    Parameters are created on the meta device (no init cost) and then filled
    one tensor at a time directly on ``device`` in ``dtype``, so peak memory is
    the model itself: about 14 GB for a full 7B model in bf16. ``num_layers``
    keeps only the first layers to fit smaller machines. The values depend on
    the device's random generator: the same seed gives other weights on CUDA.
    """
    config = shape_config(name, num_layers)
    model_class = FAMILIES[as_shape(name).family].model_class
    # Buffers (RoPE inverse frequencies) stay real and in float32, as from_pretrained leaves them.
    with init_empty_weights(include_buffers=False):
        model = model_class._from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    if config.tie_word_embeddings:  # from_pretrained ties them; _from_config on meta weights does not
        model.tie_weights()
    _materialize(model, std=config.initializer_range, seed=seed, device=torch.device(device), progress=progress)
    return model.to(device).eval()


def make_token_layout(
    batch: int,
    n_text: int,
    n_visual: int,
    image_position: int | Sequence[int] | None = None,
    vocab_size: int = 32000,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> ShapeInputs:
    """Random ids with one contiguous image block per row, as in a chat prompt.

    ``image_position`` is the number of text tokens before the image, either
    one value for all rows or one per row (rows may differ, as in real
    batches); it defaults to the middle of the text, i.e. a system prefix
    before the image and the question after it.
    """
    for label, value in (("batch", batch), ("n_text", n_text), ("n_visual", n_visual)):
        if value < 0:
            raise ValueError(f"{label} must be >= 0, got {value}")
    if image_position is None:
        image_position = n_text // 2
    if isinstance(image_position, int):
        image_position = [image_position] * batch
    positions = list(image_position)
    if len(positions) != batch:
        raise ValueError(
            f"image_position has {len(positions)} entries, expected one per row ({batch})"
        )
    bad = [p for p in positions if not 0 <= p <= n_text]
    if bad:
        raise ValueError(
            f"image_position values {bad} out of range: valid positions are 0..{n_text}"
        )
    seq_len = n_text + n_visual
    visual_mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    for row, start in enumerate(positions):
        visual_mask[row, start : start + n_visual] = True
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, seq_len), generator=generator)
    return ShapeInputs(input_ids.to(device), visual_mask.to(device))
