"""What a decoder layer is made of, as data: the fast frozen layers read the parts they need from here.

A fast frozen layer module implements one *residual structure* (``prenorm``: norm, attention, residual, norm, MLP,
residual; ``sandwich``: the same with a norm on each branch's output too). Everything else that differs between
language models with that structure is a field of `LayerAnatomy`: the attribute names of the norms, whether
queries and keys are normed per head before RoPE, how RoPE pairs dimensions, and any extra query scaling. The
registry (`shortv.registry.LANGUAGE_MODELS`) gives each language model its anatomy; nothing here names a model.

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

    def __post_init__(self) -> None:
        if self.rope not in ROPE_STYLES:
            raise ValueError(f"rope must be one of {ROPE_STYLES}, got {self.rope!r}")
        if self.query_scale not in QUERY_SCALES:
            raise ValueError(f"query_scale must be one of {QUERY_SCALES}, got {self.query_scale!r}")

    @property
    def norms(self) -> tuple[str, ...]:
        return tuple(name for name in (self.input_norm, self.attention_output_norm, self.mlp_norm,
                                       self.mlp_output_norm) if name)
