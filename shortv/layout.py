"""Which positions of the current forward are visual: the forward's plan, decided once at the entry, read by every
layer.

A `TokenLayout` says which rows of a ``(batch, seq)`` chunk are text (they get queries, ``o_proj`` and the MLP in a
frozen layer) and holds what every frozen layer of the forward would otherwise recompute. It takes one of two forms:

* **shared**: every sample has its visual tokens at the same positions (batch 1 always; padded batches of one
  template, LC's batches of variants). The text rows of a ``(batch, seq, ...)`` tensor are one ``index_select``
  along the sequence, ``(batch, width, ...)``, which is already the attention's query grid: no padding slots, no
  regrouping.
* **per sample**: the layouts differ. Text rows are flat, ``(n_text, ...)`` in ``x[text]`` order, and the attention
  runs on a zero-padded ``(batch, width)`` grid of them.

Layers add their updates back with ``index_add`` (the residual add and the write-back in one operator) and memoize,
per forward, what is the same in every layer (`memo`): the text queries' rows of the attention mask (one per mask
the decoder passes, i.e. per layer type), the RoPE tables of the keys and of the text queries (one per cos/sin pair).
Padding tokens count as text: the unpatched model computes them too, so treating them as text keeps every position
exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(eq=False)
class TokenLayout:
    """Visual/text split of a ``(batch, seq)`` chunk and the indices the fast frozen layer needs (module docstring).

    ``text_positions[b, j]`` is the position of the j-th text token of sample ``b`` (ascending), padded on the right
    to the longest sample; ``text_slots`` says which of those slots are real (None when the layout is shared: all are).
    """

    visual: torch.Tensor
    text_positions: torch.Tensor
    #: Shared layouts: the text positions (width,) of every sample. None when the samples' layouts differ.
    shared_positions: torch.Tensor | None = None
    text_slots: torch.Tensor | None = None
    #: Per-sample layouts: flat indices (into batch * seq) of the text tokens, in ``x[text]`` order...
    text_index: torch.Tensor | None = None
    #: ... and flat indices (into batch * width) of the real slots of the text grid, in the same order.
    slot_index: torch.Tensor | None = None
    _per_device: dict[torch.device, TokenLayout] = field(default_factory=dict, repr=False)
    _tails: dict[int, TokenLayout | None] = field(default_factory=dict, repr=False)
    _memo: dict[tuple, tuple[Any, Any]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_visual_mask(cls, visual: torch.Tensor) -> TokenLayout:
        visual = visual if visual.dtype == torch.bool else visual.bool()
        text = ~visual
        if visual.shape[0] == 1 or bool((visual == visual[:1]).all()):
            positions = text[0].nonzero().squeeze(1)
            return cls(visual=visual, text_positions=positions.expand(visual.shape[0], -1), shared_positions=positions)
        counts = text.sum(dim=1)
        width = int(counts.max().item())
        # A stable sort puts text positions first, in order; the tail of each row (visual positions) fills the
        # padding slots, whose results are discarded.
        order = torch.sort(visual.to(torch.int8), dim=1, stable=True).indices
        text_slots = torch.arange(width, device=visual.device)[None, :] < counts[:, None]
        return cls(visual=visual, text_positions=order[:, :width], text_slots=text_slots,
                   text_index=text.flatten().nonzero().squeeze(1), slot_index=text_slots.flatten().nonzero().squeeze(1))

    @property
    def text(self) -> torch.Tensor:
        return ~self.visual

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.visual.shape)  # type: ignore[return-value]

    @property
    def has_visual(self) -> bool:
        """Whether any position is visual (known without reading a tensor: no device sync)."""
        return self.shared_positions is None or self.shared_positions.shape[0] < self.visual.shape[1]

    @property
    def num_visual(self) -> int:
        return int(self.visual.sum().item())

    # Gathers and scatters by precomputed indices: the same copies as boolean-mask indexing, but with shapes known
    # before the layer runs, so torch.compile traces them without a graph break.
    def take_text(self, x: torch.Tensor) -> torch.Tensor:
        """The text rows of ``x`` (batch, seq, ...): (batch, width, ...) when shared, else (n_text, ...)."""
        if self.shared_positions is not None:
            return x.index_select(1, self.shared_positions)
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.text_index)

    def add_text(self, x: torch.Tensor, rows: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``x`` (batch, seq, ...) with ``rows`` (as `take_text` gives them) added at the text positions: the residual
        add of the text rows and their write-back in one operator, rounding as ``x[text] + rows``. ``inplace``: add
        into ``x`` itself (only for a tensor the caller made)."""
        if rows.dtype != x.dtype:  # promote as ``x + rows`` would
            x = x.to(torch.promote_types(x.dtype, rows.dtype))
            rows = rows.to(x.dtype)
        if self.shared_positions is not None:
            positions = self.shared_positions
            return x.index_add_(1, positions, rows) if inplace else x.index_add(1, positions, rows)
        flat = x.view(-1, *x.shape[2:]) if inplace else x.reshape(-1, *x.shape[2:])
        added = flat.index_add_(0, self.text_index, rows) if inplace else flat.index_add(0, self.text_index, rows)
        return added.view(x.shape)

    def put_text(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """A copy of ``x`` (batch, seq, ...) with its text rows replaced by ``rows`` (as `take_text` gives them)."""
        rows = rows.to(x.dtype)
        if self.shared_positions is not None:
            return x.index_copy(1, self.shared_positions, rows)
        return x.reshape(-1, *x.shape[2:]).index_copy(0, self.text_index, rows).view(x.shape)

    def to_grid(self, rows: torch.Tensor) -> torch.Tensor:
        """Text rows (as `take_text` gives them) -> a (batch, width, ...) grid, zero-padded per sample."""
        if self.shared_positions is not None:
            return rows
        batch, width = self.text_positions.shape
        grid = rows.new_zeros(batch * width, *rows.shape[1:]).index_copy(0, self.slot_index, rows)
        return grid.view(batch, width, *rows.shape[1:])

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """The real slots of a (batch, width, ...) grid, as `take_text` gives rows."""
        if self.shared_positions is not None:
            return grid
        return grid.reshape(-1, *grid.shape[2:]).index_select(0, self.slot_index)

    def memo(self, name: str, anchor: Any, build: Callable[[], Any], *key: Any) -> Any:
        """``build()``, computed once per forward for ``anchor`` (by identity: the decoder passes every layer the same
        mask and RoPE tensors, one per layer type) and ``key``. Under torch.compile it is built in place (the
        compiler deduplicates; a dict of tensors would be a side effect of the graph)."""
        if torch.compiler.is_compiling():
            return build()
        entry = (name, id(anchor), *key)
        if entry not in self._memo:
            self._memo[entry] = (anchor, build())  # holding the anchor keeps its id unique while the entry lives
        return self._memo[entry][1]

    def tail(self, length: int) -> TokenLayout | None:
        """The layout of the last ``length`` positions (None when none of them is visual), memoized.

        For decoders that run their last layers on the trailing positions only (Gemma 4's KV-shared layers when
        only the last logits are kept)."""
        if length not in self._tails:
            layout = TokenLayout.from_visual_mask(self.visual[:, self.visual.shape[1] - length :])
            self._tails[length] = layout if layout.has_visual else None
        return self._tails[length]

    def to(self, device: torch.device) -> TokenLayout:
        """The same layout on ``device`` (memoized: layers spread over devices by ``device_map`` each get one copy)."""
        if self.visual.device == device:
            return self
        if device not in self._per_device:
            moved = {name: None if value is None else value.to(device) for name, value in (
                ("visual", self.visual), ("text_positions", self.text_positions),
                ("shared_positions", self.shared_positions), ("text_slots", self.text_slots),
                ("text_index", self.text_index), ("slot_index", self.slot_index))}
            self._per_device[device] = TokenLayout(**moved)
        return self._per_device[device]
