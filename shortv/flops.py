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
  its text tokens. Output gates (a query-side gate projection, and its
  multiply at 1 FLOP per element) are counted too.

Hybrid models (``LayerDims.layers``: one `LayerDims` per layer) mix softmax
layers with linear-attention layers (Gated DeltaNet, ``kind="linear_attention"``),
which both formulas count exactly: the in-projections, the depthwise causal
convolution and the chunked delta rule over every token (as the chunked kernel
computes it, the sequence padded to whole chunks; a frozen layer still runs all
of it, because later tokens read the recurrent state), and the output gate's
projection, its gated RMSNorm, ``out_proj`` and the MLP over the updated tokens.
So a frozen linear-attention layer saves only its output half and its MLP on
visual tokens, while a frozen softmax layer also saves their queries and their
quadratic attention.

Operator-level freezing (`shortv.frozen.operators`): a layer whose visual tokens
skip only the attention update saves their queries, output gate, ``o_proj`` and
attention rows (a linear-attention layer: its output half), and runs the MLP on
every token; one whose visual tokens skip only the MLP saves the MLP (dense, MoE
router and experts, shared expert) on them. ``frozen`` is then a collection of
operator names, ``{"attention"}`` or ``{"mlp"}``; ``True`` means both (a ShortV
layer). A per-layer-input branch belongs to neither operator: an operator-level
layer runs it on every token, only a ShortV layer skips it on visual tokens.
The post-branch norms of sandwich layers are element-wise, like every other
norm but QK-norm, and not counted.

A FLOP is one multiply or one add, so a ``(a x b) @ (b x c)`` matmul is
``2abc`` FLOPs.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal, Sequence, Union

Formula = Literal["paper", "exact"]
Family = Literal["llama", "qwen2", "qwen3", "gemma3", "qwen3_5"]

_FORMULAS: tuple[str, ...] = ("paper", "exact")
#: The updates of a layer that operator-level freezing skips separately (`shortv.config.OPERATORS`).
OPERATORS = ("attention", "mlp")
#: How a layer is frozen: a bool (True: a ShortV layer, both updates) or the operators its visual tokens skip.
Frozen = Union[bool, Collection[str]]


def frozen_operators(frozen: Frozen) -> frozenset[str]:
    """``frozen`` as the set of skipped operators (True: both, False: none)."""
    if isinstance(frozen, bool):
        return frozenset(OPERATORS) if frozen else frozenset()
    if isinstance(frozen, str):
        frozen = (frozen,)
    operators = frozenset(frozen)
    unknown = sorted(operators - set(OPERATORS))
    if unknown:
        raise ValueError(f"unknown operator(s) {unknown}; a layer freezes some of {OPERATORS}")
    return operators


@dataclass(frozen=True)
class LinearAttentionDims:
    """A Gated DeltaNet token mixer: key/value heads and their dims, causal-convolution taps, delta-rule chunk."""

    key_heads: int
    value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int
    chunk_size: int = 64

    @property
    def key_dim(self) -> int:
        return self.key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.value_heads * self.value_head_dim


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
    #: An always-on shared expert beside the routed ones (its gated MLP and a 1-wide sigmoid gate), width or 0.
    shared_expert_intermediate_size: int = 0
    #: The MoE block runs beside the dense MLP (both count) instead of replacing it.
    parallel_moe: bool = False
    #: ``"attention"`` (softmax) or ``"linear_attention"`` (Gated DeltaNet, dims in ``linear``).
    kind: str = "attention"
    linear: LinearAttentionDims | None = None
    #: ``q_proj`` also emits a per-head output gate that multiplies the attention output.
    output_gate: bool = False
    #: False in a layer that reuses another layer's keys and values (KV sharing): no k/v projections.
    kv_projections: bool = True
    #: False where the values are the keys' projection (no ``v_proj``).
    value_projection: bool = True
    #: Width of a per-layer-input branch after the MLP (gate ``hidden -> p``, projection ``p -> hidden``), or 0.
    per_layer_input_size: int = 0
    #: A model whose layers differ: each layer's dims (same hidden size, vocabulary and layer count).
    layers: tuple[LayerDims, ...] = ()

    _REQUIRED = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "num_layers", "vocab_size")

    def __post_init__(self) -> None:
        for name in self._REQUIRED:
            value = getattr(self, name)
            if operator.index(value) < 1:
                raise ValueError(f"LayerDims.{name} must be >= 1, got {value}")
        if operator.index(self.intermediate_size) < (0 if self.num_experts and not self.dense_layers else 1):
            raise ValueError(f"LayerDims.intermediate_size must be >= 1, got {self.intermediate_size}")
        if self.kind not in ("attention", "linear_attention") or (self.kind == "linear_attention") != bool(self.linear):
            raise ValueError(f"LayerDims.kind must be 'attention', or 'linear_attention' with `linear` dims; got "
                             f"{self.kind!r} with linear={self.linear}")
        if self.layers and len(self.layers) != self.num_layers:
            raise ValueError(f"LayerDims.layers has {len(self.layers)} entries for {self.num_layers} layers")
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

    def layer(self, index: int | None) -> LayerDims:
        """The dims of layer ``index`` (the model's own dims where its layers are alike, or ``index`` is None)."""
        return self.layers[index] if self.layers and index is not None else self

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """The token mixer of every layer (``"attention"`` or ``"linear_attention"``)."""
        return tuple(self.layer(i).kind for i in range(self.num_layers))

    @property
    def uniform(self) -> bool:
        """Whether every layer costs the same (no per-layer dims, no dense layers among MoE ones)."""
        return not self.layers and not self.dense_layers

    @classmethod
    def from_config(cls, config: Any) -> "LayerDims":
        """Read the text decoder dims from a causal-LM or multimodal HF config (per layer where layers differ:
        ``config.layer_types`` with linear attention, per-layer head dims, KV sharing)."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        from .registry import LANGUAGE_MODELS  # the anatomy says whether q/k are normed, whether q_proj gates

        hidden = config.hidden_size
        heads = config.num_attention_heads
        num_layers = config.num_hidden_layers
        experts = getattr(config, "num_experts", None) or 0
        anatomy = LANGUAGE_MODELS.get(getattr(config, "model_type", None))
        full = dict(anatomy.anatomies).get("full_attention") if hasattr(anatomy, "anatomies") else anatomy
        moe: dict[str, Any] = {}
        if experts:
            step = getattr(config, "decoder_sparse_step", 1) or 1
            only_mlp = set(getattr(config, "mlp_only_layers", None) or ())
            parallel = bool(getattr(config, "enable_moe_block", False))
            moe = dict(
                num_experts=experts,
                experts_per_token=getattr(config, "num_experts_per_tok", None) or config.top_k_experts,
                moe_intermediate_size=config.moe_intermediate_size,
                dense_layers=() if parallel else tuple(
                    i for i in range(num_layers) if i in only_mlp or (i + 1) % step),
                shared_expert_intermediate_size=getattr(config, "shared_expert_intermediate_size", 0) or 0,
                parallel_moe=parallel,
            )
        per_layer = getattr(config, "per_layer_config", None)
        first = per_layer[0] if per_layer is not None else config
        dims = cls(
            hidden_size=hidden,
            intermediate_size=getattr(config, "intermediate_size", 0) or 0,
            num_attention_heads=heads,
            num_key_value_heads=getattr(first, "num_key_value_heads", None) or heads,
            head_dim=getattr(first, "head_dim", None) or hidden // heads,
            num_layers=num_layers,
            vocab_size=config.vocab_size,
            qk_norm=bool(full is not None and full.qk_norm),
            output_gate=bool(full is not None and getattr(full, "output_gate", False)),
            per_layer_input_size=getattr(config, "hidden_size_per_layer_input", 0) or 0,
            **moe,
        )
        layers = tuple(_layer_from_config(config, dims, i) for i in range(num_layers))
        return dims if all(layer == dims for layer in layers) else dataclasses.replace(dims, layers=layers)
def _layer_from_config(config: Any, dims: LayerDims, index: int) -> LayerDims:
    """Layer ``index``'s dims: its mixer by ``config.layer_types``, its head dims from ``config.per_layer_config``,
    KV sharing from ``config.kv_sharing_modes``, keys as values and double-wide MLPs where the config says so."""
    kind = (getattr(config, "layer_types", None) or [None] * dims.num_layers)[index]
    if kind == "linear_attention":
        linear = LinearAttentionDims(
            key_heads=config.linear_num_key_heads, value_heads=config.linear_num_value_heads,
            key_head_dim=config.linear_key_head_dim, value_head_dim=config.linear_value_head_dim,
            conv_kernel=config.linear_conv_kernel_dim,
        )
        return dataclasses.replace(dims, kind="linear_attention", linear=linear, qk_norm=False, output_gate=False)
    per_layer = getattr(config, "per_layer_config", None)
    layer = per_layer[index] if per_layer is not None else config
    sharing = getattr(config, "kv_sharing_modes", None)
    shared = sharing is not None and sharing[index] == "reuse"
    keys_as_values = bool(getattr(config, "attention_k_eq_v", False)) and kind == "full_attention"
    wide = 2 if shared and getattr(config, "use_double_wide_mlp", False) else 1
    return dataclasses.replace(
        dims,
        head_dim=getattr(layer, "head_dim", None) or dims.head_dim,
        num_key_value_heads=getattr(layer, "num_key_value_heads", None) or dims.num_key_value_heads,
        kv_projections=not shared,
        value_projection=not keys_as_values,
        intermediate_size=dims.intermediate_size * wide,
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


def _qwen36_27b() -> LayerDims:
    """Qwen3.6-27B's text decoder. From the transformers 5.24 defaults of ``Qwen3_5TextConfig`` (whose docstring
    names Qwen/Qwen3.5-27B, the architecture Qwen3.6 reuses): head_dim 256, linear-attention key/value head dims 128,
    16 key heads, conv kernel 4, a full-attention layer every 4th (``full_attention_interval=4``), vocabulary 248320,
    untied embeddings, partial rotary 0.25 (which costs what full RoPE costs). From the published
    ``Qwen/Qwen3.6-27B`` config.json (not downloadable here; as reproduced in public code that pins it, since the
    defaults describe a 9B model): hidden 5120, MLP 17408, 64 layers, 24 attention heads, 4 KV heads, 48 linear value
    heads."""
    base = LayerDims(hidden_size=5120, intermediate_size=17408, num_attention_heads=24, num_key_value_heads=4,
                     head_dim=256, num_layers=64, vocab_size=248320, qk_norm=True, output_gate=True)
    linear = dataclasses.replace(base, kind="linear_attention", qk_norm=False, output_gate=False, linear=LinearAttentionDims(
        key_heads=16, value_heads=48, key_head_dim=128, value_head_dim=128, conv_kernel=4))
    return dataclasses.replace(base, layers=tuple(base if (i + 1) % 4 == 0 else linear for i in range(64)))


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
    # Qwen3.6-27B's language model (Qwen3.5's code, model_type "qwen3_5"): 64 layers, three Gated DeltaNet layers to
    # one full-attention layer (24 query heads with an output gate, 4 KV heads of 256, QK-norm). Where each value
    # comes from: see `_qwen36_27b`.
    "qwen3.6-27b": PaperShape(_qwen36_27b(), visual_tokens=576, family="qwen3_5"),
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


def _paper_layer(dims: LayerDims, t: int, v: int, frozen: frozenset[str], layer: int | None) -> int:
    """The paper's formula, split into its attention part (``8nh^2 + 4n^2 h`` dense, ``8th^2 + 4vh^2 + 4tnh`` with
    visual queries skipped) and its MLP part (``6nmh``, or ``6tmh``)."""
    h, n = dims.hidden_size, t + v
    m = dims.experts_per_token * dims.moe_intermediate_size if dims.is_moe(layer) else dims.intermediate_size
    if "attention" in frozen:
        attention = 8 * t * h * h + 4 * v * h * h + 4 * t * n * h
    else:
        attention = 8 * n * h * h + 4 * n * n * h
    mlp = 6 * (t if "mlp" in frozen else n) * m * h
    return attention + mlp


#: Projections a ShortV layer still runs over every token: the image's keys and values feed the text queries, and a
#: linear-attention layer's input projections feed the recurrent state every later token reads.
ALL_TOKEN_PROJECTIONS = frozenset({"k_proj", "v_proj", "in_proj_qkv", "in_proj_b", "in_proj_a"})


def _mixer_projections(dims: LayerDims) -> dict[str, tuple[int, int]]:
    h = dims.hidden_size
    if dims.kind == "linear_attention":
        la = dims.linear
        return {"in_proj_qkv": (h, 2 * la.key_dim + la.value_dim), "in_proj_b": (h, la.value_heads),
                "in_proj_a": (h, la.value_heads), "in_proj_z": (h, la.value_dim), "out_proj": (la.value_dim, h)}
    q_dim = dims.num_attention_heads * dims.head_dim
    kv_dim = dims.num_key_value_heads * dims.head_dim
    projections = {"q_proj": (h, q_dim * (2 if dims.output_gate else 1))}
    if dims.kv_projections:
        projections["k_proj"] = (h, kv_dim)
        if dims.value_projection:
            projections["v_proj"] = (h, kv_dim)
    return {**projections, "o_proj": (q_dim, h)}


def _mlp_projections(dims: LayerDims, layer: int | None) -> dict[str, tuple[int, int]]:
    h, m = dims.hidden_size, dims.intermediate_size
    dense = {"gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}
    if not dims.is_moe(layer):
        return dense
    active = dims.experts_per_token * dims.moe_intermediate_size
    moe = {"router": (h, dims.num_experts), "experts_gate_up": (h, 2 * active), "experts_down": (active, h)}
    shared = dims.shared_expert_intermediate_size
    if shared:
        moe.update(shared_expert_gate_up=(h, 2 * shared), shared_expert_down=(shared, h), shared_expert_gate=(h, 1))
    return {**dense, **moe} if dims.parallel_moe else moe


def layer_projections(dims: LayerDims, layer: int | None = None) -> dict[str, tuple[int, int]]:
    """``(in_features, out_features)`` per routed token of a decoder layer's projections: its token mixer (softmax
    attention, with keys/values unless it reuses another layer's; or a linear-attention mixer), then the gated FFN,
    or for an MoE layer the router and the active experts' gated FFNs taken together (and a shared expert), then a
    per-layer-input branch. ``layer`` picks the layer's own dims in a model whose layers differ."""
    own = dims.layer(layer)
    projections = {**_mixer_projections(own), **_mlp_projections(own, layer)}
    if own.per_layer_input_size:
        p = own.per_layer_input_size
        projections.update(per_layer_input_gate=(own.hidden_size, p), per_layer_projection=(p, own.hidden_size))
    return projections


def projection_rows(name: str, t: int, v: int, frozen: bool) -> int:
    """Rows a projection multiplies in prefill: every token, except text-only updates in a ShortV layer."""
    return t if frozen and name not in ALL_TOKEN_PROJECTIONS else t + v


#: FLOPs of an RMSNorm per normed element: square, sum, scale by the inverse RMS, scale by the weight.
RMS_NORM_FLOPS_PER_ELEMENT = 4


def attention_flops(dims: LayerDims, t: int, v: int, frozen: bool, layer: int | None = None) -> int:
    """The token mixing of one layer over one sample that is not a projection.

    Softmax attention: ``Q K^T`` and ``softmax(.) V``, queries being the tokens the layer updates. Linear attention:
    `linear_mixer_flops`, over every token whether the layer is frozen or not."""
    own = dims.layer(layer)
    if own.kind == "linear_attention":
        return linear_mixer_flops(own.linear, t + v)
    queries = t if frozen else t + v
    return 4 * queries * (t + v) * own.num_attention_heads * own.head_dim


def linear_mixer_flops(linear: LinearAttentionDims, n: int) -> int:
    """The depthwise causal convolution and the chunked gated delta rule over ``n`` tokens.

    The convolution runs with ``kernel - 1`` positions of zero padding and keeps the first ``n`` outputs, as the
    reference kernel computes it.

    Per value head, with chunk ``C``, ``N = n`` padded to whole chunks, key/value head dims ``dk``/``dv``: the chunk's
    ``k_beta K^T`` and ``Q K^T`` (``2 C dk`` each per token), two unit-triangular solves (``(C - 1) (dv + dk)``),
    reading and updating the state (``6 dk dv``) and the within-chunk output (``2 C dv``). Query/key heads serve
    ``value_heads / key_heads`` value heads each, as the kernel repeats them."""
    conv = 2 * (n + linear.conv_kernel - 1) * linear.conv_kernel * (2 * linear.key_dim + linear.value_dim)
    c, dk, dv = linear.chunk_size, linear.key_head_dim, linear.value_head_dim
    padded = math.ceil(n / c) * c
    per_head = padded * (4 * c * dk + (c - 1) * (dv + dk) + 6 * dk * dv + 2 * c * dv)
    return conv + linear.value_heads * per_head


def norm_and_gate_flops(dims: LayerDims, t: int, v: int, frozen: bool, layer: int | None = None) -> int:
    """Per-head RMSNorm of the queries of the updated tokens and the keys of every token (QK-norm), and the output
    gates: the attention output times its gate, or a linear-attention layer's gated RMSNorm, on updated tokens."""
    own = dims.layer(layer)
    updated = t if frozen else t + v
    if own.kind == "linear_attention":
        return (RMS_NORM_FLOPS_PER_ELEMENT + 1) * updated * own.linear.value_dim
    flops = updated * own.num_attention_heads * own.head_dim if own.output_gate else 0
    if own.qk_norm:
        keys = (t + v) * own.num_key_value_heads if own.kv_projections else 0
        flops += RMS_NORM_FLOPS_PER_ELEMENT * (updated * own.num_attention_heads + keys) * own.head_dim
    return flops


def _exact_layer(dims: LayerDims, t: int, v: int, frozen: frozenset[str], layer: int | None) -> int:
    own = dims.layer(layer)
    mixer = set(_mixer_projections(own))
    mlp = set(_mlp_projections(own, layer))

    def skipped(name: str) -> bool:  # whether this projection's visual rows are skipped
        if name in mixer:
            return "attention" in frozen
        if name in mlp:
            return "mlp" in frozen
        return len(frozen) == len(OPERATORS)  # a per-layer-input branch: only in a ShortV layer

    projections = sum(
        2 * projection_rows(name, t, v, skipped(name)) * fan_in * fan_out
        for name, (fan_in, fan_out) in layer_projections(dims, layer).items()
    )
    queries_skipped = "attention" in frozen
    return (projections + attention_flops(dims, t, v, queries_skipped, layer)
            + norm_and_gate_flops(dims, t, v, queries_skipped, layer))


def layer_flops(
    dims: LayerDims, t: int, v: int, frozen: Frozen, formula: Formula = "paper", layer: int | None = None
) -> int:
    """Prefill FLOPs of one decoder layer over ``t`` text and ``v`` visual tokens; ``frozen``: False (dense), True
    (ShortV layer) or the operators the visual tokens skip (``{"attention"}``, ``{"mlp"}``).

    ``layer`` matters in models whose layers differ (`LayerDims.layers`, or MoE models with dense layers,
    `LayerDims.dense_layers`); ``None`` means the model's own dims (a sparse layer when it has experts). A
    linear-attention layer is counted exactly under both formulas (the paper's has no term for it)."""
    _check_tokens(t, v)
    _check_formula(formula)
    operators = frozen_operators(frozen)
    if formula == "paper" and dims.layer(layer).kind == "attention":
        return _paper_layer(dims.layer(layer), t, v, operators, layer)
    return _exact_layer(dims, t, v, operators, layer)


def operator_saving(
    dims: LayerDims, t: int, v: int, layer: int, operator: str, formula: Formula = "exact"
) -> int:
    """FLOPs saved by letting the visual tokens of ``layer`` skip ``operator`` ("attention" or "mlp") alone."""
    return layer_flops(dims, t, v, False, formula, layer) - layer_flops(dims, t, v, {operator}, formula, layer)


def layer_operators(
    dims: LayerDims,
    frozen_layers: Sequence[int] = (),
    attention_layers: Sequence[int] = (),
    mlp_layers: Sequence[int] = (),
) -> dict[int, frozenset[str]]:
    """Frozen layer -> skipped operators, from ShortV layers and operator-level layers (validated indices)."""
    operators: dict[int, frozenset[str]] = {}
    for layers, skipped in ((frozen_layers, OPERATORS), (attention_layers, ("attention",)), (mlp_layers, ("mlp",))):
        for index in _frozen_set(dims, layers):
            operators[index] = operators.get(index, frozenset()) | frozenset(skipped)
    return operators


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
    *,
    attention_layers: Sequence[int] = (),
    mlp_layers: Sequence[int] = (),
) -> int:
    """Prefill FLOPs of the decoder stack; repeated frozen indices count once. ``attention_layers`` /
    ``mlp_layers``: operator-level layers, whose visual tokens skip only that update.

    The LM head is excluded by default, as in the paper. When included it is
    counted for ``lm_head_positions`` positions: only the last one is needed to
    pick the next token, but a forward pass that returns all logits pays for
    ``t + v``.
    """
    frozen = _frozen_set(dims, frozen_layers)
    if lm_head_positions < 1:
        raise ValueError(f"lm_head_positions must be >= 1, got {lm_head_positions}")
    if attention_layers or mlp_layers:  # operator-level layers: each layer by what it skips
        operators = layer_operators(dims, frozen_layers, attention_layers, mlp_layers)
        total = sum(layer_flops(dims, t, v, operators.get(i, False), formula, layer=i) for i in range(dims.num_layers))
    elif not dims.uniform:  # layers differ: sum them one by one
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
    *,
    attention_layers: Sequence[int] = (),
    mlp_layers: Sequence[int] = (),
) -> float:
    """ShortV FLOPs as a fraction of the dense model's (lower is cheaper); operator-level layers as in
    `model_flops`."""
    dense = model_flops(dims, t, v, (), formula, include_lm_head)
    shortv = model_flops(dims, t, v, frozen_layers, formula, include_lm_head, attention_layers=attention_layers,
                         mlp_layers=mlp_layers)
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
