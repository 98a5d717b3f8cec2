"""The naive Layer Contribution: one full forward per layer and token type, through the public reference freeze.

Kept deliberately plain: it is the definition the efficient implementation in shortv.contribution must match.
"""

import torch

from shortv import ShortVConfig, apply_shortv, remove_shortv, using_visual_mask
from shortv.contribution import divergence_between
from shortv.registry import find_decoder_layers


@torch.no_grad()
def naive_sample_contribution(model, sample, visual_mask, token_types=("visual", "text"), divergence="kl"):
    """(LC per token type and layer, layer evaluations) for one sample; ``visual_mask`` is (1, seq) bool."""
    num_layers = len(find_decoder_layers(model))
    seq = visual_mask.shape[1]
    targets = list(sample.target_positions) if sample.target_positions is not None else [seq - 1]

    def log_probs():
        return torch.log_softmax(model(**sample.inputs, use_cache=False).logits[0, targets].float(), dim=-1)

    original = log_probs()
    masks = {"visual": visual_mask, "text": ~visual_mask}
    result = {}
    for token_type in token_types:
        values = []
        for layer in range(num_layers):
            apply_shortv(model, ShortVConfig([layer], mode="reference"))
            try:
                # Freezing "X tokens" = declaring them the frozen positions of the reference layer.
                with using_visual_mask(model, masks[token_type]):
                    variant = log_probs()
            finally:
                remove_shortv(model)
            values.append(divergence_between(variant, original, divergence).mean().item())
        result[token_type] = values
    # One full forward per layer and token type, plus the unmodified forward.
    evaluations = len(token_types) * num_layers * num_layers + num_layers
    return result, evaluations


@torch.no_grad()
def naive_operator_contribution(model, sample, visual_mask, divergence="kl"):
    """Per-operator visual LC: one full forward per layer and operator, that operator's update removed on visual
    rows through the public reference operator freeze (``attention_layers`` / ``mlp_layers``)."""
    num_layers = len(find_decoder_layers(model))
    seq = visual_mask.shape[1]
    targets = list(sample.target_positions) if sample.target_positions is not None else [seq - 1]

    def log_probs():
        return torch.log_softmax(model(**sample.inputs, use_cache=False).logits[0, targets].float(), dim=-1)

    original = log_probs()
    result = {}
    for token_type, field in (("visual_attention", "attention_layers"), ("visual_mlp", "mlp_layers")):
        values = []
        for layer in range(num_layers):
            apply_shortv(model, ShortVConfig(mode="reference", **{field: [layer]}))
            try:
                with using_visual_mask(model, visual_mask):
                    variant = log_probs()
            finally:
                remove_shortv(model)
            values.append(divergence_between(variant, original, divergence).mean().item())
        result[token_type] = values
    return result, 2 * num_layers * num_layers + num_layers
