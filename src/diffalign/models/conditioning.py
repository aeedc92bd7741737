"""The text conditioning a UNet call needs, as one small batchable value.

Recipes build 2B batches (winner and loser share a prompt), slice them and move them between devices; keeping
the SDXL extras (pooled embedding, time ids) in the same object means that code never branches on the family.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """Text conditioning for a batch: what the UNet needs besides `x_t` and `t`.

    `prompt_embeds` [B, L, D] for every family; SDXL also has the pooled `text_embeds` [B, P] of its second
    encoder and the micro-conditioning `time_ids` [B, 6] (original size, crop top-left, target size, as (h, w)).
    """

    prompt_embeds: Tensor
    text_embeds: Tensor | None = None
    time_ids: Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> "Conditioning":
        return Conditioning(*(None if x is None else fn(x) for x in (self.prompt_embeds, self.text_embeds, self.time_ids)))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Conditioning":
        return self._map(lambda x: x.to(device=device, dtype=dtype if x.is_floating_point() else None))

    def __getitem__(self, index: int | slice | Tensor | Sequence[int]) -> "Conditioning":
        """Select rows; an int keeps the batch dimension (a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self._map(lambda x: x[index])

    def repeat(self, n: int) -> "Conditioning":
        """`n` copies stacked along the batch ([c, c] for winner and loser in one 2B forward pass)."""
        return self._map(lambda x: torch.cat([x] * n))

    def replace(self, **changes: Any) -> "Conditioning":
        return dataclasses.replace(self, **changes)

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch; all items must have the same fields set."""
        fields = ("prompt_embeds", "text_embeds", "time_ids")
        values = []
        for name in fields:
            parts = [getattr(c, name) for c in items]
            if all(p is None for p in parts):
                values.append(None)
            elif any(p is None for p in parts):
                raise ValueError(f"cannot concatenate Conditioning items: {name} is set on some and not others")
            else:
                values.append(torch.cat(parts))
        return Conditioning(*values)
