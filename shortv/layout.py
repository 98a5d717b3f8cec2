"""Which positions of the current forward are visual, computed once per model forward and shared by all layers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TokenLayout:
    """Visual/text split of a ``(batch, seq)`` chunk, plus the gather indices the fast frozen layer needs.

    ``text_positions[b, j]`` is the position of the j-th non-visual token of sample ``b`` (ascending), padded on the
    right to the longest sample; ``text_slots`` says which of those slots are real. Padding tokens count as text:
    the unpatched model computes them too, so treating them as text keeps every position exact.
    """

    visual: torch.Tensor
    text_positions: torch.Tensor
    text_slots: torch.Tensor
    #: Flat indices (into batch * seq) of the text tokens, in ``x[text]`` order.
    text_index: torch.Tensor
    #: Flat indices (into batch * width) of the real slots of the text grid, in the same order.
    slot_index: torch.Tensor
    _per_device: dict[torch.device, TokenLayout] = field(default_factory=dict, repr=False)
    _tails: dict[int, TokenLayout | None] = field(default_factory=dict, repr=False)

    @classmethod
    def from_visual_mask(cls, visual: torch.Tensor) -> TokenLayout:
        visual = visual.bool()
        text = ~visual
        counts = text.sum(dim=1)
        width = int(counts.max().item()) if text.numel() else 0
        # A stable sort puts text positions first, in order; the tail of each row (visual positions) fills the
        # padding slots, whose results are discarded.
        order = torch.sort(visual.to(torch.int8), dim=1, stable=True).indices
        text_positions = order[:, :width]
        text_slots = torch.arange(width, device=visual.device)[None, :] < counts[:, None]
        return cls(visual=visual, text_positions=text_positions, text_slots=text_slots,
                   text_index=text.flatten().nonzero().squeeze(1), slot_index=text_slots.flatten().nonzero().squeeze(1))

    @property
    def text(self) -> torch.Tensor:
        return ~self.visual

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.visual.shape)  # type: ignore[return-value]

    @property
    def num_visual(self) -> int:
        return int(self.visual.sum().item())

    # Gathers and scatters by precomputed indices: the same copies as boolean-mask indexing, but with shapes known
    # before the layer runs, so torch.compile traces them without a graph break.
    def take_text(self, x: torch.Tensor) -> torch.Tensor:
        """The text rows of ``x`` (batch, seq, ...) as (n_text, ...)."""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.text_index)

    def put_text(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """A copy of ``x`` (batch, seq, ...) with its text rows replaced by ``rows`` (n_text, ...)."""
        return x.reshape(-1, *x.shape[2:]).index_copy(0, self.text_index, rows.to(x.dtype)).view(x.shape)

    def to_grid(self, rows: torch.Tensor) -> torch.Tensor:
        """Text rows (n_text, ...) -> a zero-padded (batch, width, ...) grid."""
        batch, width = self.text_positions.shape
        grid = rows.new_zeros(batch * width, *rows.shape[1:]).index_copy(0, self.slot_index, rows)
        return grid.view(batch, width, *rows.shape[1:])

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """The real slots of a (batch, width, ...) grid as (n_text, ...)."""
        return grid.reshape(-1, *grid.shape[2:]).index_select(0, self.slot_index)

    def tail(self, length: int) -> TokenLayout | None:
        """The layout of the last ``length`` positions (None when none of them is visual), memoized.

        For decoders that run their last layers on the trailing positions only (Gemma 4's KV-shared layers when
        only the last logits are kept)."""
        if length not in self._tails:
            visual = self.visual[:, self.visual.shape[1] - length :]
            self._tails[length] = TokenLayout.from_visual_mask(visual) if bool(visual.any()) else None
        return self._tails[length]

    def to(self, device: torch.device) -> TokenLayout:
        """The same layout on ``device`` (memoized: layers spread over devices by ``device_map`` each get one copy)."""
        if self.visual.device == device:
            return self
        if device not in self._per_device:
            self._per_device[device] = TokenLayout(
                visual=self.visual.to(device),
                text_positions=self.text_positions.to(device),
                text_slots=self.text_slots.to(device),
                text_index=self.text_index.to(device),
                slot_index=self.slot_index.to(device),
            )
        return self._per_device[device]
