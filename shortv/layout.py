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
    _per_device: dict[torch.device, TokenLayout] = field(default_factory=dict, repr=False)

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
        return cls(visual=visual, text_positions=text_positions, text_slots=text_slots)

    @property
    def text(self) -> torch.Tensor:
        return ~self.visual

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.visual.shape)  # type: ignore[return-value]

    @property
    def num_visual(self) -> int:
        return int(self.visual.sum().item())

    def to(self, device: torch.device) -> TokenLayout:
        """The same layout on ``device`` (memoized: layers spread over devices by ``device_map`` each get one copy)."""
        if self.visual.device == device:
            return self
        if device not in self._per_device:
            self._per_device[device] = TokenLayout(
                visual=self.visual.to(device),
                text_positions=self.text_positions.to(device),
                text_slots=self.text_slots.to(device),
            )
        return self._per_device[device]
