"""VTW's own choice of K: the first layer from which withdrawing every visual token barely moves the output.

For each candidate ``K`` (`vtw_layers`: 1, 2, ..., from the first K the model allows) the model runs each calibration input with VTW at ``K`` and without it, and
the divergence of the next-token distributions at the last position is averaged over the inputs; the first ``K``
whose mean is below ``threshold`` is chosen. A model that allows K up to some layer only (Gemma 4's KV sharing) is
searched up to there. The divergence is shortv's layer-contribution KL,
``KL(P_withdrawn || P_original)`` (`shortv.contribution.divergence_between`). The returned config records the rule,
the threshold and every mean it computed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..contribution import divergence_between
from ..patch import _unwrap
from ..registry import find_decoder_layers
from .config import TokenPruningConfig
from .fastv import _check_applicable, apply_vtw, get_pruning_state, remove_token_pruning


def _last_log_probs(model: nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs, use_cache=False).logits[:, -1].float().log_softmax(dim=-1)




def vtw_layers(model: nn.Module) -> tuple[list[int], ValueError | None]:
    """The K values VTW's rule tries on ``model``, in order: from the first K the model allows (a hybrid model needs K
    past its first full-attention layer) up to the first it refuses after that (Gemma 4's KV sharing), and that
    refusal (None: every K up to the last layer is allowed). None allowed: the first refusal, raised (one line)."""
    layers, allowed, first_error = find_decoder_layers(model), [], None
    for k in range(1, len(layers)):
        try:
            _check_applicable(_unwrap(model), TokenPruningConfig("vtw", k), layers)
        except ValueError as error:
            if allowed:
                return allowed, error
            first_error = first_error or error
            continue
        allowed.append(k)
    if not allowed:
        raise first_error or ValueError("VTW needs a model of at least two decoder layers")
    return allowed, None


@torch.no_grad()
def choose_vtw_layer(model: nn.Module, inputs: Iterable[dict], threshold: float) -> TokenPruningConfig:
    """The VTW config at the first K (of `vtw_layers`) whose mean KL over ``inputs`` (each a ``model(**x)`` batch) is
    < ``threshold``; its provenance records the threshold, the samples, the first K tried and every mean.

    Raises when no K qualifies (the message lists the means)."""
    if get_pruning_state(model) is not None:
        raise ValueError("choose_vtw_layer needs a model without FastV/VTW applied; remove_token_pruning(model)")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"the KL threshold must be a positive number, got {threshold!r}")
    batches = list(inputs)
    if not batches:
        raise ValueError("choose_vtw_layer needs at least one calibration input")
    candidates, refused = vtw_layers(model)
    original = [_last_log_probs(model, batch) for batch in batches]
    means: list[float] = []
    for k in candidates:
        apply_vtw(model, k)
        try:
            values = [divergence_between(_last_log_probs(model, batch), log_original, "kl")
                      for batch, log_original in zip(batches, original)]
        finally:
            remove_token_pruning(model)
        means.append(float(torch.cat(values).mean()))
        if means[-1] < threshold:
            samples = sum(len(batch.get("input_ids", batch.get("inputs_embeds"))) for batch in batches)
            provenance = {"rule": "vtw_kl", "threshold": float(threshold), "kl": means, "first_k": candidates[0],
                          "samples": samples}
            return TokenPruningConfig("vtw", k, provenance=provenance)
    listed = ", ".join(f"K={k}: {value:.4g}" for k, value in zip(candidates, means))
    beyond = "" if refused is None else f"; larger K are refused: {refused}"
    raise ValueError(f"no K withdraws the visual tokens with a mean KL below {threshold}: {listed}{beyond}")
