"""The naive Layer Contribution: one full forward per layer and token type, through the public reference freeze.

Kept deliberately plain: it is the definition the efficient implementation in shortv.contribution must match.
"""

import torch

from shortv import ShortVConfig, apply_shortv, remove_shortv, using_visual_mask
from shortv.contribution import divergence_between
from shortv.registry import find_decoder_layers


@torch.no_grad()
def _naive(model, sample, variants, divergence):
    """{variant: LC per layer}: for each variant (a config for layer l, and the positions it freezes), one full
    forward per layer."""
    num_layers = len(find_decoder_layers(model))
    seq = sample.inputs["input_ids"].shape[1]
    targets = list(sample.target_positions) if sample.target_positions is not None else [seq - 1]

    def log_probs():
        return torch.log_softmax(model(**sample.inputs, use_cache=False).logits[0, targets].float(), dim=-1)

    original = log_probs()
    result = {}
    for name, (config_for, frozen) in variants.items():
        values = []
        for layer in range(num_layers):
            apply_shortv(model, config_for(layer))
            try:
                # Freezing "X tokens" = declaring them the frozen positions of the reference layer.
                with using_visual_mask(model, frozen):
                    variant = log_probs()
            finally:
                remove_shortv(model)
            values.append(divergence_between(variant, original, divergence).mean().item())
        result[name] = values
    return result


def naive_sample_contribution(model, sample, visual_mask, token_types=("visual", "text"), divergence="kl"):
    """(LC per token type and layer, layer evaluations) for one sample; ``visual_mask`` is (1, seq) bool."""
    num_layers = len(find_decoder_layers(model))
    masks = {"visual": visual_mask, "text": ~visual_mask}
    variants = {token_type: (lambda layer: ShortVConfig([layer], mode="reference"), masks[token_type])
                for token_type in token_types}
    # One full forward per layer and token type, plus the unmodified forward.
    return _naive(model, sample, variants, divergence), len(token_types) * num_layers * num_layers + num_layers


def naive_operator_contribution(model, sample, visual_mask, divergence="kl"):
    """Per-operator visual LC: one full forward per layer and operator, that operator's update removed on visual
    rows through the public reference operator freeze (``attention_layers`` / ``mlp_layers``)."""
    num_layers = len(find_decoder_layers(model))
    variants = {
        "visual_attention": (lambda layer: ShortVConfig(attention_layers=[layer], mode="reference"), visual_mask),
        "visual_mlp": (lambda layer: ShortVConfig(mlp_layers=[layer], mode="reference"), visual_mask),
    }
    return _naive(model, sample, variants, divergence), 2 * num_layers * num_layers + num_layers
