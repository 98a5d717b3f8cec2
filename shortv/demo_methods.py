"""The demo's method comparison at matched prefill FLOPs (issues #24 and #25): ShortV, operator-level ShortV, FastV,
VTW and ShortV + FastV on the same model, test questions and calibration samples, at each FLOPs target.

Each method has its own grid of settings, priced by the library's FLOPs models (`shortv.flops`,
`shortv.flops_pruning`, exact count, at the test prompts' mean shape), and a rule for a target:

* ShortV (layer-level): the N = 1..L lowest-visual-LC layers; the N whose FLOPs are nearest the target.
* operator-level ShortV: `shortv.selection.select_operators` at the target (attention and MLP updates of visual
  tokens by per-operator LC per FLOP saved, the fewest that bring the FLOPs to the target or below).
* FastV: K = 2 (the paper's), R = 1 - kept / v for kept = 1..v-1 visual tokens; the kept count nearest (kept = 0
  would be VTW at K = 2).
* VTW: K = 1..L-1; the K nearest.
* ShortV + FastV: the paper's FastV setting (K = 2, R = 50%) and the LC-ranked N = 0..L nearest the target.

A nearest-setting method reaches a target inside its grid widened by half a step at each end, so the chosen
setting is within half a step of the target (its `Match.tolerance`); operator-level reaches any target down to all
its operators frozen, and lands at most one operator's saving below. A target a method cannot reach is a row of
its own that gives the span of the method's FLOPs and no accuracy: never a silently moved setting.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from .config import ShortVConfig
from .contribution import LCResult
from .flops import LayerDims, flops_ratio
from .flops_pruning import fastv_ratio, vtw_ratio
from .patch import apply_shortv, remove_shortv
from .pruning import TokenPruningConfig, apply_token_pruning, remove_token_pruning
from .selection import select_operators

#: Prefill FLOPs targets of the comparison (fractions of the unpatched model's).
FLOPS_TARGETS = (0.30, 0.45, 0.55)
METHODS = ("shortv", "operators", "fastv", "vtw", "shortv+fastv")
METHOD_LABELS = {
    "shortv": "ShortV (LC-ranked layers)",
    "operators": "operator-level ShortV",
    "fastv": "FastV (K=2)",
    "vtw": "VTW",
    "shortv+fastv": "ShortV + FastV (K=2, R=50%)",
    "vtw_rule": "VTW, K by its KL rule",
}
#: FastV's K, and ShortV + FastV's FastV setting: the paper's (arXiv 2504.00502, LLaVA-1.5-7B).
FASTV_K, COMPOSED_R = 2, 0.5
#: VTW's own rule (`shortv.pruning.choose_vtw_layer`): the first K whose mean KL on the calibration samples is below.
VTW_THRESHOLD = 0.05


@dataclass(frozen=True)
class Setting:
    """One method's parameters and its prefill FLOPs ratio."""

    method: str
    flops_ratio: float
    layers: tuple[int, ...] = ()  # ShortV layers (whole layers; with FastV, its ShortV part)
    attention_layers: tuple[int, ...] = ()
    mlp_layers: tuple[int, ...] = ()
    k: int | None = None
    ratio: float | None = None  # FastV's R
    kept: int | None = None  # FastV's visual tokens kept per sample

    def config(self) -> ShortVConfig | TokenPruningConfig:
        if self.method in ("shortv", "operators"):
            return ShortVConfig(list(self.layers), attention_layers=list(self.attention_layers),
                                mlp_layers=list(self.mlp_layers))
        if self.method in ("vtw", "vtw_rule"):
            return TokenPruningConfig("vtw", self.k)
        return TokenPruningConfig("fastv", self.k, self.ratio, shortv_layers=list(self.layers))

    def describe(self) -> str:
        def listed(layers: tuple[int, ...]) -> str:
            return ",".join(map(str, layers)) or "-"

        if self.method == "shortv":
            return f"N={len(self.layers)}: {listed(self.layers)}"
        if self.method == "operators":
            return (f"{len(self.layers) * 2 + len(self.attention_layers) + len(self.mlp_layers)} ops: both "
                    f"{listed(self.layers)} / attn {listed(self.attention_layers)} / MLP {listed(self.mlp_layers)}")
        if self.method in ("vtw", "vtw_rule"):
            return f"K={self.k}"
        fastv = f"K={self.k}, R={100 * self.ratio:.1f}% (keeps {self.kept})"
        return fastv if self.method == "fastv" else f"{fastv}, N={len(self.layers)}: {listed(self.layers)}"


@contextmanager
def applied(model: Any, setting: Setting) -> Iterator[Any]:
    """``model`` with ``setting`` applied for the block; removed after it, whatever happens."""
    config = setting.config()
    if isinstance(config, TokenPruningConfig):
        apply_token_pruning(model, config)
        remove = remove_token_pruning
    else:
        apply_shortv(model, config)
        remove = remove_shortv
    try:
        yield model
    finally:
        remove(model)


def method_grid(method: str, dims: LayerDims, t: int, v: int, order: list[int]) -> list[Setting]:
    """Every setting of a nearest-setting ``method`` (not "operators"), by ascending FLOPs."""
    layers = dims.num_layers
    if method == "shortv":
        grid = [Setting("shortv", flops_ratio(dims, t, v, order[:n], formula="exact"), tuple(order[:n]))
                for n in range(1, layers + 1)]
    elif method == "fastv":
        grid = [Setting("fastv", fastv_ratio(dims, t, v, FASTV_K, (v - kept) / v), k=FASTV_K, ratio=(v - kept) / v,
                        kept=kept) for kept in range(1, v)]
    elif method == "vtw":
        grid = [Setting("vtw", vtw_ratio(dims, t, v, k), k=k, ratio=1.0, kept=0) for k in range(1, layers)]
    elif method == "shortv+fastv":
        kept = TokenPruningConfig("fastv", FASTV_K, COMPOSED_R).kept(v)
        grid = [Setting("shortv+fastv", fastv_ratio(dims, t, v, FASTV_K, COMPOSED_R, order[:n]), tuple(order[:n]),
                        k=FASTV_K, ratio=COMPOSED_R, kept=kept) for n in range(layers + 1)]
    else:
        raise ValueError(f"no grid for method {method!r}; one of {METHODS[:1] + METHODS[2:]}")
    return sorted(grid, key=lambda s: s.flops_ratio)


@dataclass
class Match:
    """A method at a FLOPs target: its setting (None: the target is out of its reach), its lowest and highest FLOPs
    ratios, and how far from the target its rule may land (``tolerance``; operator-level lands at or below it)."""

    target: float
    method: str
    setting: Setting | None
    lowest: float
    highest: float
    tolerance: float


def nearest(target: float, method: str, grid: list[Setting]) -> Match:
    """The setting of ``grid`` (ascending FLOPs, two or more) nearest ``target`` (ties: the cheaper one)."""
    ratios = [s.flops_ratio for s in grid]
    steps = [high - low for low, high in zip(ratios, ratios[1:])]
    if not ratios[0] - steps[0] / 2 <= target <= ratios[-1] + steps[-1] / 2:
        return Match(target, method, None, ratios[0], ratios[-1], 0.0)
    index = min(range(len(grid)), key=lambda i: (abs(ratios[i] - target), ratios[i]))
    around = steps[max(index - 1, 0) : index + 1]
    return Match(target, method, grid[index], ratios[0], ratios[-1], max(around) / 2)


def operator_match(target: float, lc: LCResult, dims: LayerDims, t: int, v: int) -> Match:
    """`select_operators` at ``target``; tolerance: the saving of the last operator it chose."""
    def chosen(**how: Any) -> ShortVConfig:
        return select_operators(lc, dims=dims, text_tokens=t, visual_tokens=v, **how)

    every = chosen(n=len(chosen(n=0).provenance["operator_order"]))
    lowest = every.provenance["flops_ratio"]
    if target < lowest:
        return Match(target, "operators", None, lowest, 1.0, 0.0)
    config = chosen(flops_ratio=target)
    count = config.provenance["n_operators"]
    step = chosen(n=count - 1).provenance["flops_ratio"] - config.provenance["flops_ratio"] if count else 0.0
    setting = Setting("operators", config.provenance["flops_ratio"], tuple(config.layers),
                      tuple(config.attention_layers), tuple(config.mlp_layers))
    return Match(target, "operators", setting, lowest, 1.0, step)


def matches(targets: tuple[float, ...], lc: LCResult, dims: LayerDims, t: int, v: int) -> list[Match]:
    """Every method at every target, in the order target, :data:`METHODS`."""
    grids = {method: method_grid(method, dims, t, v, lc.order) for method in METHODS if method != "operators"}
    return [operator_match(target, lc, dims, t, v) if method == "operators" else nearest(target, method, grids[method])
            for target in targets for method in METHODS]


def vtw_rule_setting(config: Any, dims: LayerDims, t: int, v: int) -> tuple[Setting, dict[str, Any]]:
    """The demo's setting of the VTW ``config`` its own KL rule chose (`shortv.calibrate.vtw_rule`), and the rule's
    record (threshold, KL per K)."""
    return Setting("vtw_rule", vtw_ratio(dims, t, v, config.k), k=config.k, ratio=1.0, kept=0), config.provenance


@dataclass
class ComparisonRow:
    """One row of the comparison: a method at a target (None: VTW's own rule), with its accuracy when reached."""

    target: float | None
    method: str
    setting: dict[str, Any] | None
    description: str
    flops_ratio: float | None
    lowest: float
    highest: float
    tolerance: float
    accuracy: float | None = None
    per_type: dict[str, float] = field(default_factory=dict)

    @property
    def reached(self) -> bool:
        return self.setting is not None

    @classmethod
    def of(cls, match: Match, accuracy: float | None = None, per_type: dict | None = None) -> ComparisonRow:
        s = match.setting
        span = f"out of reach: {_percent(match.lowest)} to {_percent(match.highest)}"
        return cls(match.target, match.method, None if s is None else asdict(s), span if s is None else s.describe(),
                   None if s is None else s.flops_ratio, match.lowest, match.highest, match.tolerance, accuracy,
                   per_type or {})


def compare(score: Any, targets: tuple[float, ...], lc: LCResult, dims: LayerDims, t: int,
            v: int) -> list[ComparisonRow]:
    """The comparison's rows at ``targets``: each method's `Match`, scored by ``score(setting) -> (accuracy,
    per_type)`` when reached (the caller caches: a setting met twice is scored once)."""
    return [ComparisonRow.of(match, *(score(match.setting) if match.setting is not None else (None, None)))
            for match in matches(targets, lc, dims, t, v)]


def comparison_markdown(rows: list[ComparisonRow], types: list[str]) -> str:
    """The comparison table: target, method, its setting, exact FLOPs, accuracy and accuracy per question type."""
    lines = ["| FLOPs target | method | setting | FLOPs | accuracy | " + " | ".join(types) + " |",
             "|" + "---|" * (5 + len(types))]
    for r in rows:
        target = "-" if r.target is None else f"{100 * r.target:.0f}%"
        flops = "-" if r.flops_ratio is None else f"{100 * r.flops_ratio:.1f}%"
        accuracy = "-" if r.accuracy is None else f"{100 * r.accuracy:.1f}%"
        cells = [("-" if r.accuracy is None else f"{100 * r.per_type[kind]:.0f}") for kind in types]
        lines.append(f"| {target} | {METHOD_LABELS[r.method]} | {r.description} | {flops} | {accuracy} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def verdicts(rows: list[ComparisonRow]) -> list[str]:
    """One line per target saying which method won by accuracy (ties as ties), and one on operator- vs layer-level."""
    lines = []
    targets = sorted({r.target for r in rows if r.target is not None})
    for target in targets:
        reached = [r for r in rows if r.target == target and r.reached]
        missed = [METHOD_LABELS[r.method] for r in rows if r.target == target and not r.reached]
        out = f"; out of reach: {', '.join(missed)}" if missed else ""
        if not reached:
            lines.append(f"{100 * target:.0f}% of the FLOPs: no method reaches it{out}.")
            continue
        best = max(r.accuracy for r in reached)
        winners = [r for r in reached if r.accuracy == best]
        named = " and ".join(f"{METHOD_LABELS[r.method]} ({r.description}, {_percent(r.flops_ratio)} FLOPs)"
                             for r in winners)
        verb = "tie" if len(winners) > 1 else "wins"
        alone = " (the only method that reaches it)" if len(reached) == 1 else ""
        lines.append(f"{100 * target:.0f}% of the FLOPs: {named} {verb} at {_percent(best)}{alone}{out}.")
    pairs = []
    for target in targets:
        layer, operator = (next(r for r in rows if r.target == target and r.method == method)
                           for method in ("shortv", "operators"))
        if layer.reached and operator.reached:
            pairs.append((target, layer, operator))
    if not pairs:
        lines.append("Operator-level vs layer-level: no target that both reach.")
        return lines
    score = {"operator-level better": 0, "layer-level better": 0, "tie": 0}
    parts = []
    for target, layer, operator in pairs:
        outcome = ("tie" if operator.accuracy == layer.accuracy
                   else "operator-level better" if operator.accuracy > layer.accuracy else "layer-level better")
        score[outcome] += 1
        parts.append(f"{100 * target:.0f}%: operator-level {_percent(operator.accuracy)} at "
                     f"{_percent(operator.flops_ratio)} vs layer-level {_percent(layer.accuracy)} at "
                     f"{_percent(layer.flops_ratio)}, {outcome}")
    beat = score["operator-level better"]
    lines.append(f"Operator-level {'beat' if beat else 'did not beat'} layer-level ShortV at equal FLOPs: better at "
                 f"{beat}, worse at {score['layer-level better']}, tied at {score['tie']} of the {len(pairs)} targets "
                 f"both reach ({'; '.join(parts)}).")
    return lines
