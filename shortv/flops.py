"""Prefill FLOPs of dense decoder layers and ShortV layers (arXiv 2504.00502).

A ShortV layer freezes the visual tokens: they still provide keys and values,
but skip the query/output projections, the attention queries and the FFN.

Two formulas are available:

* ``"paper"``: the paper's closed form, per layer, with ``n = t + v``::

      dense:  2n(4h + 3m)h + 4n^2 h
      ShortV: 2t(4h + 3m)h + 4vh^2 + 4tnh

* ``"exact"``: the same matmul accounting with the real projection shapes, so
  grouped-query attention (fewer K/V heads) and ``heads * head_dim != hidden``
  are counted correctly. Like the paper it counts the full ``n x n`` attention
  square although causal masking (or a sliding window) leaves less of it useful:
  that is what dense SDPA/eager kernels without a causal fast path actually
  compute, and it keeps ``"exact"`` equal to ``"paper"`` for multi-head
  attention. Element-wise work (norms, RoPE, softmax, activations) is O(n h)
  and ignored by both, except QK-norm, which "exact" counts at 4 FLOPs per
  normed element (square, sum, scale, weight) of the queries and keys it norms.
  MoE layers (``LayerDims.num_experts > 0``): the router (``hidden -> experts``)
  and the ``experts_per_token`` active experts' gated MLPs per routed token;
  "paper" uses the active experts' width as ``m``. A ShortV layer routes only
  its text tokens.

A FLOP is one multiply or one add, so a ``(a x b) @ (b x c)`` matmul is
``2abc`` FLOPs.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Literal, Sequence

Formula = Literal["paper", "exact"]
Family = Literal["llama", "qwen2", "qwen3", "gemma3"]

_FORMULAS: tuple[str, ...] = ("paper", "exact")


@dataclass(frozen=True)
class LayerDims:
    """The decoder dimensions that determine FLOPs, independent of weights."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_layers: int
    vocab_size: int
    #: Queries and keys RMS-normed per head (Qwen3, Gemma 3).
    qk_norm: bool = False
    #: Sparse MoE MLP: routed experts (0: every layer has the dense MLP of ``intermediate_size``).
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    #: In an MoE model, the layers that keep the dense MLP (Qwen's ``mlp_only_layers`` / ``decoder_sparse_step``).
    dense_layers: tuple[int, ...] = ()

    _REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "num_layers", "vocab_size")

    def __post_init__(self) -> None:
        for name in self._REQUIRED:
            value = getattr(self, name)
            if operator.index(value) < 1:
                raise ValueError(f"LayerDims.{name} must be >= 1, got {value}")
        if self.num_experts:
            if not 1 <= self.experts_per_token <= self.num_experts or self.moe_intermediate_size < 1:
                raise ValueError(
                    f"an MoE LayerDims needs 1 <= experts_per_token <= num_experts ({self.num_experts}) and "
                    f"moe_intermediate_size >= 1, got {self.experts_per_token} and {self.moe_intermediate_size}"
                )
        object.__setattr__(self, "dense_layers", tuple(sorted(set(self.dense_layers))))

    def is_moe(self, layer: int | None = None) -> bool:
        """Whether ``layer`` has the MoE block (``None``: a sparse layer of this model, if it has any)."""
        return self.num_experts > 0 and (layer is None or layer not in self.dense_layers)

    @classmethod
    def from_config(cls, config: Any) -> "LayerDims":
        """Read the text decoder dims from a causal-LM or multimodal HF config."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        from .registry import LANGUAGE_MODELS  # the anatomy says whether q/k are normed

        hidden = config.hidden_size
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        num_layers = config.num_hidden_layers
        experts = getattr(config, "num_experts", None) or 0
        moe: dict[str, Any] = {}
        if experts:
            step = getattr(config, "decoder_sparse_step", 1) or 1
            only_mlp = set(getattr(config, "mlp_only_layers", None) or ())
            moe = dict(
                num_experts=experts,
                experts_per_token=config.num_experts_per_tok,
                moe_intermediate_size=config.moe_intermediate_size,
                dense_layers=tuple(i for i in range(num_layers) if i in only_mlp or (i + 1) % step),
            )
        anatomy = LANGUAGE_MODELS.get(getattr(config, "model_type", None))
        return cls(
            hidden_size=hidden,
            intermediate_size=config.intermediate_size,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=getattr(config, "head_dim", None) or hidden // heads,
            num_layers=num_layers,
            vocab_size=config.vocab_size,
            qk_norm=bool(anatomy is not None and anatomy.qk_norm),
            **moe,
        )


@dataclass(frozen=True)
class PaperShape:
    """A real architecture (the paper's, or a family it did not cover) for FLOPs and benchmarks; ``family``
    picks the causal LM that `shortv.shapes` builds for it."""

    dims: LayerDims
    visual_tokens: int
    family: Family


def _vicuna_dims(num_layers: int, hidden: int, intermediate: int, heads: int) -> LayerDims:
    """Vicuna-v1.5 LM of LLaVA 1.5 / NeXT: multi-head attention, llava-hf vocab."""
    return LayerDims(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        num_layers=num_layers,
        vocab_size=32064,
    )


_VICUNA_7B = _vicuna_dims(num_layers=32, hidden=4096, intermediate=11008, heads=32)
_VICUNA_13B = _vicuna_dims(num_layers=40, hidden=5120, intermediate=13824, heads=40)

PAPER_SHAPES: dict[str, PaperShape] = {
    # 336px CLIP-L/14 image: 24 x 24 patches.
    "llava-1.5-7b": PaperShape(_VICUNA_7B, visual_tokens=576, family="llama"),
    "llava-1.5-13b": PaperShape(_VICUNA_13B, visual_tokens=576, family="llama"),
    # AnyRes with a 2x2 grid: 4 tiles + 1 base image, 576 tokens each.
    "next-7b": PaperShape(_VICUNA_7B, visual_tokens=2880, family="llama"),
    "next-13b": PaperShape(_VICUNA_13B, visual_tokens=2880, family="llama"),
    # Qwen2-VL's count follows the resolution; 576 is a 672 x 672 image
    # (48 x 48 patches of 14 px, merged 2 x 2), comparable to LLaVA-1.5.
    "qwen2-vl-7b": PaperShape(
        LayerDims(
            hidden_size=3584,
            intermediate_size=18944,
            num_attention_heads=28,
            num_key_value_heads=4,
            head_dim=128,
            num_layers=28,
            vocab_size=152064,
        ),
        visual_tokens=576,
        family="qwen2",
    ),
    # Qwen3-VL-8B's language model (QK-norm; its interleaved M-RoPE costs what 1-D RoPE does). 576 visual tokens:
    # a 768 x 768 image (48 x 48 patches of 16 px, merged 2 x 2); DeepStack's additions are O(v h) and not counted.
    "qwen3-vl-8b": PaperShape(
        LayerDims(
            hidden_size=4096,
            intermediate_size=12288,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            num_layers=36,
            vocab_size=151936,
            qk_norm=True,
        ),
        visual_tokens=576,
        family="qwen3",
    ),
    # Gemma 3 12B's language model (sandwich norms, QK-norm, 5 sliding-window layers of 1024 per global layer;
    # with 640 tokens every window covers the whole prompt). One image is 256 tokens; 576 is for comparison.
    "gemma3-12b": PaperShape(
        LayerDims(
            hidden_size=3840,
            intermediate_size=15360,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            num_layers=48,
            vocab_size=262208,
            qk_norm=True,
        ),
        visual_tokens=576,
        family="gemma3",
    ),
}


def shape_names() -> list[str]:
    """Names accepted wherever a paper shape is looked up."""
    return sorted(PAPER_SHAPES)


def get_shape(name: str) -> PaperShape:
    """Look up a paper shape, listing the valid names on a typo."""
    try:
        return PAPER_SHAPES[name]
    except KeyError:
        valid = ", ".join(shape_names())
        raise ValueError(f"unknown shape {name!r}; valid names: {valid}") from None


def _check_tokens(t: int, v: int) -> None:
    for label, count in (("t (text tokens)", t), ("v (visual tokens)", v)):
        if operator.index(count) < 0:
            raise ValueError(f"{label} must be >= 0, got {count}")
    if t + v == 0:
        raise ValueError("need at least one token (t + v > 0)")


def _check_formula(formula: str) -> None:
    if formula not in _FORMULAS:
        raise ValueError(f"formula must be one of {_FORMULAS}, got {formula!r}")


def _paper_layer(dims: LayerDims, t: int, v: int, frozen: bool, layer: int | None) -> int:
    h, n = dims.hidden_size, t + v
    m = dims.experts_per_token * dims.moe_intermediate_size if dims.is_moe(layer) else dims.intermediate_size
    if not frozen:
        return 2 * n * (4 * h + 3 * m) * h + 4 * n * n * h
    return 2 * t * (4 * h + 3 * m) * h + 4 * v * h * h + 4 * t * n * h


#: Projections a ShortV layer still runs over every token: the image's keys and values feed the text queries.
ALL_TOKEN_PROJECTIONS = frozenset({"k_proj", "v_proj"})


def layer_projections(dims: LayerDims, layer: int | None = None) -> dict[str, tuple[int, int]]:
    """``(in_features, out_features)`` per routed token of a decoder layer's projections: Llama-shaped attention,
    then the gated FFN, or for an MoE layer the router and the active experts' gated FFNs taken together."""
    h = dims.hidden_size
    q_dim = dims.num_attention_heads * dims.head_dim
    kv_dim = dims.num_key_value_heads * dims.head_dim
    attention = {"q_proj": (h, q_dim), "k_proj": (h, kv_dim), "v_proj": (h, kv_dim), "o_proj": (q_dim, h)}
    if dims.is_moe(layer):
        active = dims.experts_per_token * dims.moe_intermediate_size
        return {**attention, "router": (h, dims.num_experts), "experts_gate_up": (h, 2 * active),
                "experts_down": (active, h)}
    m = dims.intermediate_size
    return {**attention, "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}


def projection_rows(name: str, t: int, v: int, frozen: bool) -> int:
    """Rows a projection multiplies in prefill: every token, except text-only q/o/FFN in a ShortV layer."""
    return t if frozen and name not in ALL_TOKEN_PROJECTIONS else t + v


#: FLOPs of an RMSNorm per normed element: square, sum, scale by the inverse RMS, scale by the weight.
RMS_NORM_FLOPS_PER_ELEMENT = 4


def attention_flops(dims: LayerDims, t: int, v: int, frozen: bool) -> int:
    """``Q K^T`` and ``softmax(.) V`` of one layer over one sample: queries are the tokens the layer updates."""
    queries = t if frozen else t + v
    return 4 * queries * (t + v) * dims.num_attention_heads * dims.head_dim


def qk_norm_flops(dims: LayerDims, t: int, v: int, frozen: bool) -> int:
    """Per-head RMSNorm of the queries of the updated tokens and the keys of every token (0 without QK-norm)."""
    if not dims.qk_norm:
        return 0
    queries = t if frozen else t + v
    normed = queries * dims.num_attention_heads + (t + v) * dims.num_key_value_heads
    return RMS_NORM_FLOPS_PER_ELEMENT * normed * dims.head_dim


def _exact_layer(dims: LayerDims, t: int, v: int, frozen: bool, layer: int | None) -> int:
    projections = sum(
        2 * projection_rows(name, t, v, frozen) * fan_in * fan_out
        for name, (fan_in, fan_out) in layer_projections(dims, layer).items()
    )
    return projections + attention_flops(dims, t, v, frozen) + qk_norm_flops(dims, t, v, frozen)


def layer_flops(
    dims: LayerDims, t: int, v: int, frozen: bool, formula: Formula = "paper", layer: int | None = None
) -> int:
    """Prefill FLOPs of one decoder layer over ``t`` text and ``v`` visual tokens.

    ``layer`` matters only in MoE models with dense layers (`LayerDims.dense_layers`); ``None`` means a sparse
    layer when the model has experts."""
    _check_tokens(t, v)
    _check_formula(formula)
    if formula == "paper":
        return _paper_layer(dims, t, v, frozen, layer)
    return _exact_layer(dims, t, v, frozen, layer)


def _frozen_set(dims: LayerDims, frozen_layers: Sequence[int]) -> frozenset[int]:
    """Validate layer indices (no negative indexing: it hides off-by-one bugs)."""
    indices = frozenset(operator.index(i) for i in frozen_layers)
    bad = sorted(i for i in indices if not 0 <= i < dims.num_layers)
    if bad:
        raise ValueError(
            f"frozen layer indices {bad} out of range: valid layers are 0..{dims.num_layers - 1}"
        )
    return indices


def model_flops(
    dims: LayerDims,
    t: int,
    v: int,
    frozen_layers: Sequence[int] = (),
    formula: Formula = "paper",
    include_lm_head: bool = False,
    lm_head_positions: int = 1,
) -> int:
    """Prefill FLOPs of the decoder stack; repeated frozen indices count once.

    The LM head is excluded by default, as in the paper. When included it is
    counted for ``lm_head_positions`` positions: only the last one is needed to
    pick the next token, but a forward pass that returns all logits pays for
    ``t + v``.
    """
    frozen = _frozen_set(dims, frozen_layers)
    if lm_head_positions < 1:
        raise ValueError(f"lm_head_positions must be >= 1, got {lm_head_positions}")
    if dims.dense_layers:  # layers differ: sum them one by one
        total = sum(layer_flops(dims, t, v, i in frozen, formula, layer=i) for i in range(dims.num_layers))
    else:
        n_frozen = len(frozen)
        total = n_frozen * layer_flops(dims, t, v, frozen=True, formula=formula)
        total += (dims.num_layers - n_frozen) * layer_flops(dims, t, v, frozen=False, formula=formula)
    if include_lm_head:
        total += 2 * lm_head_positions * dims.hidden_size * dims.vocab_size
    return total


def flops_ratio(
    dims: LayerDims,
    t: int,
    v: int,
    frozen_layers: Sequence[int],
    formula: Formula = "paper",
    include_lm_head: bool = False,
) -> float:
    """ShortV FLOPs as a fraction of the dense model's (lower is cheaper)."""
    dense = model_flops(dims, t, v, (), formula, include_lm_head)
    shortv = model_flops(dims, t, v, frozen_layers, formula, include_lm_head)
    return shortv / dense


def ideal_speedup(
    dims: LayerDims,
    t: int,
    v: int,
    frozen_layers: Sequence[int],
    formula: Formula = "paper",
    include_lm_head: bool = False,
) -> float:
    """Upper bound on prefill speedup if time were proportional to FLOPs."""
    return 1.0 / flops_ratio(dims, t, v, frozen_layers, formula, include_lm_head)
