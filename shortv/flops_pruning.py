"""Prefill FLOPs of token pruning (FastV, VTW) and of its composition with ShortV, over `shortv.flops`.

Every method is a per-layer *token budget*: how many visual tokens are in the sequence at each decoder layer (they
provide keys and values there), and whether they are updated (dense) or frozen (ShortV: no query, no ``W_O``, no
MLP). Text tokens are always all present and updated. `budget_flops` prices a budget with `shortv.flops.layer_flops`
layer by layer, so every family that module covers (GQA, QK-norm, MoE, output gates, KV sharing, linear attention)
is priced here the same way; the methods only build budgets:

* dense: every layer has all ``v`` visual tokens, updated.
* ShortV: the frozen layers have all ``v``, frozen.
* FastV (K, R): layers ``< K`` as dense; from layer K on, the ``round((1 - R) v)`` kept visual tokens only
  (queries, keys and MLP rows, so attention is over ``t + kept`` keys).
* VTW (K): from layer K on, no visual token at all.
* ShortV + FastV: FastV's budget, and the frozen layers freeze whatever visual tokens they have: all ``v`` before K,
  the kept ones from K on (their keys/values only).

A linear-attention layer (Gated DeltaNet) after the cut runs its recurrence over the tokens still present; layers
before K keep theirs over every token.

Ranking (FastV): the kept tokens are the ones layer ``K - 1`` attends to most. With an eager attention the weights
come for free; with SDPA they are recomputed: ``Q K^T`` of the ranking queries against every key of that layer,
``2 q n H d`` FLOPs (``q = 1`` for the last prompt token, as FastV's code ranks; ``q = n`` for the mean over all
queries). `ranking_flops` counts it; at LLaVA-1.5-7B's shape it is ~6e-7 of the prefill for the last token and
~4e-4 for the mean, so the ratios below leave it out unless asked (``ranking=``). The head-mean and top-k are
``O(H n + v log v)``: not counted.

The LM head is not counted (as in the paper): ratios are of the decoder stack.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Literal, Sequence

from .flops import Formula, LayerDims, _frozen_set, layer_flops
from .pruning.config import check_cut

Ranking = Literal["last", "mean"]
_RANKINGS: tuple[str, ...] = ("last", "mean")


@dataclass(frozen=True)
class LayerBudget:
    """The visual tokens one decoder layer sees: ``visual`` of them are in its sequence (their keys/values exist);
    ``frozen``: they are not updated (no query, output projection or MLP), as in a ShortV layer."""

    visual: int
    frozen: bool = False

    def __post_init__(self) -> None:
        if operator.index(self.visual) < 0:
            raise ValueError(f"LayerBudget.visual must be >= 0, got {self.visual}")


def kept_visual_tokens(v: int, ratio: float) -> int:
    """Visual tokens FastV keeps when it prunes a fraction ``ratio`` (R) of ``v``: ``round((1 - R) v)``, halves up."""
    _check_ratio(ratio)
    return math.floor((1 - ratio) * v + 0.5)


def _check_ratio(ratio: float) -> None:
    if not 0 <= ratio < 1:
        raise ValueError(f"R (the fraction of visual tokens pruned) must be in [0, 1), got {ratio}")


def _check_cut(dims: LayerDims, k: int) -> int:
    k = operator.index(k)
    check_cut(k, dims.num_layers)
    return k


def token_budget(
    dims: LayerDims, v: int, frozen_layers: Sequence[int] = (), cut: int | None = None, kept: int | None = None
) -> tuple[LayerBudget, ...]:
    """The budget of every layer: ``v`` visual tokens up to layer ``cut`` (exclusive), ``kept`` from it on (no cut:
    ``v`` everywhere); the ``frozen_layers`` freeze the visual tokens they have."""
    frozen = _frozen_set(dims, frozen_layers)
    if operator.index(v) < 0:
        raise ValueError(f"v (visual tokens) must be >= 0, got {v}")
    if cut is not None:
        cut = _check_cut(dims, cut)
        if kept is None or not 0 <= operator.index(kept) <= v:
            raise ValueError(f"kept visual tokens must be in 0..{v}, got {kept}")
    return tuple(
        LayerBudget(v if cut is None or i < cut else kept, frozen=i in frozen) for i in range(dims.num_layers)
    )


def dense_budget(dims: LayerDims, v: int) -> tuple[LayerBudget, ...]:
    return token_budget(dims, v)


def shortv_budget(dims: LayerDims, v: int, frozen_layers: Sequence[int]) -> tuple[LayerBudget, ...]:
    return token_budget(dims, v, frozen_layers)


def fastv_budget(
    dims: LayerDims, v: int, k: int, ratio: float, frozen_layers: Sequence[int] = ()
) -> tuple[LayerBudget, ...]:
    """FastV with layer K the first to run on the kept tokens and a fraction R pruned; with ``frozen_layers``, ShortV
    + FastV (the frozen layers from K on hold the kept visual tokens' keys/values only)."""
    return token_budget(dims, v, frozen_layers, cut=k, kept=kept_visual_tokens(v, ratio))


def vtw_budget(dims: LayerDims, v: int, k: int, frozen_layers: Sequence[int] = ()) -> tuple[LayerBudget, ...]:
    """VTW: from layer K on, the visual tokens have left the sequence."""
    return token_budget(dims, v, frozen_layers, cut=k, kept=0)


def layer_budget_flops(
    dims: LayerDims, t: int, budget: Sequence[LayerBudget], formula: Formula = "exact"
) -> list[int]:
    """Prefill FLOPs of every layer under ``budget`` (one `LayerBudget` per layer) over ``t`` text tokens."""
    if len(budget) != dims.num_layers:
        raise ValueError(f"the budget has {len(budget)} layers, the model {dims.num_layers}")
    return [
        0 if t + layer.visual == 0 else layer_flops(dims, t, layer.visual, layer.frozen, formula, layer=i)
        for i, layer in enumerate(budget)
    ]


def budget_flops(dims: LayerDims, t: int, budget: Sequence[LayerBudget], formula: Formula = "exact") -> int:
    """Prefill FLOPs of the decoder stack under ``budget``."""
    return sum(layer_budget_flops(dims, t, budget, formula))


def ranking_flops(dims: LayerDims, t: int, v: int, k: int, ranking: Ranking = "last") -> int:
    """FLOPs of recomputing layer ``K - 1``'s attention scores to rank the visual tokens (SDPA gives no weights):
    ``Q K^T`` of one query (``"last"``) or of every query (``"mean"``) against the ``t + v`` keys, every head."""
    if ranking not in _RANKINGS:
        raise ValueError(f"ranking must be one of {_RANKINGS}, got {ranking!r}")
    own = dims.layer(_check_cut(dims, k) - 1)
    if own.kind != "attention":
        valid = [i + 1 for i, kind in enumerate(dims.layer_kinds[:-1]) if kind == "attention"]
        raise ValueError(f"FastV ranks by the attention of layer K - 1 = {k - 1}, a {own.kind} layer here; K with "
                         f"a softmax-attention layer before it: {valid}")
    n = t + v
    queries = 1 if ranking == "last" else n
    return 2 * queries * n * own.num_attention_heads * own.head_dim


def budget_ratio(dims: LayerDims, t: int, v: int, budget: Sequence[LayerBudget], formula: Formula = "exact",
                 extra: int = 0) -> float:
    """FLOPs of ``budget`` (plus ``extra``, e.g. `ranking_flops`) as a fraction of the dense model's."""
    return (budget_flops(dims, t, budget, formula) + extra) / budget_flops(dims, t, dense_budget(dims, v), formula)


def fastv_ratio(dims: LayerDims, t: int, v: int, k: int, ratio: float, frozen_layers: Sequence[int] = (),
                formula: Formula = "exact", ranking: Ranking | None = None) -> float:
    """FastV's (or, with ``frozen_layers``, ShortV + FastV's) prefill FLOPs over the dense model's; ``ranking``
    adds the cost of recomputing the ranking scores."""
    extra = 0 if ranking is None else ranking_flops(dims, t, v, k, ranking)
    return budget_ratio(dims, t, v, fastv_budget(dims, v, k, ratio, frozen_layers), formula, extra)


def vtw_ratio(dims: LayerDims, t: int, v: int, k: int, frozen_layers: Sequence[int] = (),
              formula: Formula = "exact") -> float:
    """VTW's prefill FLOPs over the dense model's."""
    return budget_ratio(dims, t, v, vtw_budget(dims, v, k, frozen_layers), formula)
