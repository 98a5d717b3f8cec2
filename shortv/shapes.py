"""Random-weight causal LMs with the real dimensions of the paper's models.

Timing and memory depend on tensor shapes, not weight values, so benchmarks
can run at full scale without downloading checkpoints. The visual encoder is
left out: ShortV only changes the language decoder.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from accelerate import init_empty_weights
import transformers
from transformers import PretrainedConfig, PreTrainedModel

from shortv.flops import get_shape

# Per family: the causal LM built for a shape, and the non-shape settings of the original checkpoints.
_FAMILIES: dict[str, dict[str, Any]] = {
    # Vicuna-v1.5 (LLaVA-1.5 / LLaVA-NeXT vicuna).
    "llama": dict(model="LlamaForCausalLM", config="LlamaConfig", head_dim=True, settings=dict(
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
    )),
    # Qwen2-VL's LM; its multimodal RoPE is replaced by 1-D RoPE, which costs the same. Qwen2 derives head_dim.
    "qwen2": dict(model="Qwen2ForCausalLM", config="Qwen2Config", head_dim=False, settings=dict(
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )),
    # Qwen3-VL's LM (QK-norm), likewise with 1-D RoPE.
    "qwen3": dict(model="Qwen3ForCausalLM", config="Qwen3Config", head_dim=True, settings=dict(
        max_position_embeddings=262144, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5e6},
    )),
    # Gemma 3's LM: sandwich norms, QK-norm, 5 sliding (1024) : 1 global layers, global RoPE linearly scaled by 8.
    "gemma3": dict(model="Gemma3ForCausalLM", config="Gemma3TextConfig", head_dim=True, settings=dict(
        max_position_embeddings=131072, rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=1024,
        tie_word_embeddings=True,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
    )),
}


class ShapeInputs(NamedTuple):
    """A batch of token ids and where the image tokens sit in each row."""

    input_ids: torch.Tensor
    visual_mask: torch.Tensor


def shape_config(name: str, num_layers: int | None = None) -> PretrainedConfig:
    """The HF config of a shape's language model, optionally truncated to its first layers."""
    shape = get_shape(name)
    dims = shape.dims
    if num_layers is None:
        num_layers = dims.num_layers
    if not 1 <= num_layers <= dims.num_layers:
        raise ValueError(
            f"num_layers for {name!r} must be in 1..{dims.num_layers}, got {num_layers}"
        )
    family = _FAMILIES[shape.family]
    config_class = getattr(transformers, family["config"])
    extra = {"head_dim": dims.head_dim} if family["head_dim"] else {}
    return config_class(
        vocab_size=dims.vocab_size,
        hidden_size=dims.hidden_size,
        intermediate_size=dims.intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=dims.num_attention_heads,
        num_key_value_heads=dims.num_key_value_heads,
        **{"tie_word_embeddings": False, **extra, **family["settings"]},
    )


def _random_parameter(
    name: str, like: torch.Tensor, std: float, generator: torch.Generator
) -> torch.nn.Parameter:
    """Matrices ~ N(0, std); norm scales 1 and biases 0 so activations stay O(1)."""
    data = torch.empty(like.shape, dtype=like.dtype, device="cpu")
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


def _materialize(model: torch.nn.Module, std: float, seed: int) -> None:
    """Replace meta parameters in place, one tensor at a time, keeping ties shared."""
    generator = torch.Generator().manual_seed(seed)
    done: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in done:
                done[id(param)] = _random_parameter(name, param, std, generator)
            module._parameters[name] = done[id(param)]


def build_shape_model(
    name: str,
    num_layers: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> PreTrainedModel:
    """A CPU, eval-mode causal LM with random weights and ``name``'s real dimensions.

    Parameters are created on the meta device (no init cost) and then filled
    one tensor at a time directly in ``dtype``, so peak memory is the model
    itself: about 14 GB for a full 7B model in bf16. ``num_layers`` keeps only
    the first layers to fit smaller machines. Use ``.to(device)`` afterwards.
    """
    config = shape_config(name, num_layers)
    model_class = getattr(transformers, _FAMILIES[get_shape(name).family]["model"])
    # Buffers (RoPE inverse frequencies) stay real and in float32, as from_pretrained leaves them.
    with init_empty_weights(include_buffers=False):
        model = model_class._from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    _materialize(model, std=config.initializer_range, seed=seed)
    return model.eval()


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
