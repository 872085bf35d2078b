"""Batching token rows for a causal LM: the one padding helper of the project.

    ids, mask, shifts = pad_rows([[2, 5, 9], [2, 7]], pad_id=0, left=True)
    model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))

Left padding puts every row's last token at the last position (answers end there, so only the
last few positions need logits); right padding keeps position = index.
"""
from __future__ import annotations

from typing import Sequence

import torch


def pad_rows(seqs: Sequence[Sequence[int]], pad_id: int, *, left: bool,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``(input_ids, attention_mask, shifts)``: rows padded to the longest with ``pad_id``;
    ``shifts[i]`` is how far row i moved right (0 for right padding)."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    shifts = []
    for row, seq in enumerate(seqs):
        shift = width - len(seq) if left else 0
        if len(seq):
            ids[row, shift:shift + len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, shift:shift + len(seq)] = 1
        shifts.append(shift)
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask, shifts


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: 0 at each row's first real token."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)
