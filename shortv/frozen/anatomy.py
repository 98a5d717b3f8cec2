"""What a decoder layer is made of, as data: the fast frozen layers read the parts they need from here.

A fast frozen layer module implements one *residual structure* (``prenorm``: norm, attention, residual, norm, MLP,
residual; ``sandwich``: the same with a norm on each branch's output too, and optionally a parallel MoE branch, a
per-layer-input branch and an output scale; ``linear_attention``: pre-norm around a Gated DeltaNet token mixer).
Everything else that differs between language models with that structure is a field of `LayerAnatomy`: the
attribute names of the norms, whether queries and keys are normed per head before RoPE, how RoPE pairs dimensions,
extra query scaling, an output gate, a value norm, keys and values shared across layers. The registry
(`shortv.registry.LANGUAGE_MODELS`) gives each language model its anatomy; nothing here names a model.

A language model whose decoder layers are not all alike (hybrid linear/full attention) has `LayerKinds`: one
anatomy per layer type, picked by an attribute of each layer that holds its entry of ``config.layer_types``.

The MLP slot holds a dense gated MLP or a sparse MoE block alike: the fast layers call it on the text rows only, as
one ``(1, rows, hidden)`` sequence, so a per-token router sees exactly the tokens it would see unpatched, minus
the frozen ones.
"""

from __future__ import annotations

from dataclasses import dataclass

#: RoPE pairing: ``"half"`` rotates dimension i with i + d/2 (Llama's ``rotate_half``); ``"interleaved"`` rotates
#: dimension 2i with 2i + 1. Either way only the first ``cos.shape[-1]`` dimensions of a head are rotated (partial
#: rotary), the rest pass through.
ROPE_STYLES = ("half", "interleaved")
#: Extra scaling of the queries after RoPE: ``"llama4"`` multiplies by ``1 + beta * log(1 + floor(pos / L))`` with
#: ``beta = rope_parameters["llama_4_scaling_beta"]`` and ``L = rope_parameters["original_max_position_embeddings"]``.
QUERY_SCALES = (None, "llama4")


@dataclass(frozen=True)
class ParallelMoE:
    """A sparse MoE branch beside the dense MLP, in the layers where ``layer.<enabled>`` is true.

    The MLP slot then computes ``mlp_norm(mlp(m)) + output_norm(experts(input_norm(r), router(r)))``, with ``m`` the
    normed and ``r`` the raw residual stream entering it; the anatomy's ``mlp_output_norm`` follows on the sum."""

    enabled: str
    router: str
    experts: str
    input_norm: str
    output_norm: str
    mlp_norm: str


@dataclass(frozen=True)
class PerLayerInput:
    """A residual branch after the MLP fed by the layer's per-layer input (call argument ``argument``):
    ``x + norm(projection(activation(gate(x)) * per_layer_input))``, in the layers where ``layer.<enabled>`` is set."""

    enabled: str
    gate: str
    activation: str
    projection: str
    norm: str
    argument: str


@dataclass(frozen=True)
class LayerAnatomy:
    """One language model's decoder layer: which fast layer runs it, and the attribute names of its parts."""

    #: Module under ``shortv.frozen`` with the compute-skipping layer for this residual structure.
    module: str = "prenorm"
    #: The attention module (with ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``).
    attention: str = "self_attn"
    #: Norm on the layer input, before attention.
    input_norm: str = "input_layernorm"
    #: Norm on the attention output, before the residual add (sandwich layers only).
    attention_output_norm: str | None = None
    #: Norm on the residual stream before the MLP.
    mlp_norm: str = "post_attention_layernorm"
    #: Norm on the MLP output, before the residual add (sandwich layers only).
    mlp_output_norm: str | None = None
    #: The MLP, dense or MoE.
    mlp: str = "mlp"
    #: ``attention.q_norm`` / ``attention.k_norm``: RMSNorm over each head's dims, before RoPE.
    qk_norm: bool = False
    rope: str = "half"
    query_scale: str | None = None
    #: ``q_proj`` emits each head's query and an output gate side by side; the attention output is multiplied by
    #: ``sigmoid(gate)`` before ``o_proj``.
    output_gate: bool = False
    #: ``attention.v_norm``: RMSNorm over each value head.
    value_norm: bool = False
    #: A layer whose ``attention.v_proj`` is None takes its values from ``k_proj``'s output (before ``k_norm``).
    value_from_key: bool = False
    #: Keys/values shared across layers: a layer with ``attention.is_kv_shared_layer`` reads them from the
    #: ``shared_kv_states`` argument (by ``attention.layer_type``) instead of projecting; one with
    #: ``attention.store_full_length_kv`` writes its keys/values (every token, cache included) there.
    kv_sharing: bool = False
    #: Optional sandwich branches and a buffer scaling the whole layer output (text rows only when frozen).
    parallel_moe: ParallelMoE | None = None
    per_layer_input: PerLayerInput | None = None
    output_scale: str | None = None

    def __post_init__(self) -> None:
        if self.rope not in ROPE_STYLES:
            raise ValueError(f"rope must be one of {ROPE_STYLES}, got {self.rope!r}")
        if self.query_scale not in QUERY_SCALES:
            raise ValueError(f"query_scale must be one of {QUERY_SCALES}, got {self.query_scale!r}")

    @property
    def norms(self) -> tuple[str, ...]:
        return tuple(name for name in (self.input_norm, self.attention_output_norm, self.mlp_norm,
                                       self.mlp_output_norm) if name)


@dataclass(frozen=True)
class LayerKinds:
    """Anatomies of a language model whose decoder layers differ by type (e.g. linear and full attention).

    ``type_attribute`` names the decoder-layer attribute holding the layer's type (its ``config.layer_types``
    entry); ``anatomies`` pairs each type with its anatomy."""

    type_attribute: str
    anatomies: tuple[tuple[str, LayerAnatomy], ...]

    def type_of(self, layer: object) -> str | None:
        return getattr(layer, self.type_attribute, None)

    def anatomy_of(self, layer: object) -> LayerAnatomy | None:
        return dict(self.anatomies).get(self.type_of(layer))

    @property
    def qk_norm(self) -> bool:
        """Whether the model's softmax-attention layers norm queries and keys."""
        return any(anatomy.qk_norm for _, anatomy in self.anatomies)
