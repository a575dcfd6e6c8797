"""What every task is made of: batches of token ids with the positions to score.

A Batch says which next tokens count (`target_mask`) so one scorer serves
running text, answer choices and copied paragraphs alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor          # [B, T]
    attention_mask: torch.Tensor     # [B, T], 1 = real token
    target_mask: torch.Tensor        # [B, T], 1 = position whose next token is scored
    extra: dict = field(default_factory=dict)


@dataclass
class Task:
    name: str
    batches: list[Batch]
    stats: Callable[[torch.Tensor, Batch, torch.Tensor | None], dict[str, float]]
    summary: Callable[[dict[str, float]], dict[str, float]]
    needs_teacher: bool = False
    # Tasks that generate text cannot be scored from one forward pass: they run whole, given
    # (model, teacher), and are for evaluation only, never for the importance metric.
    run: Callable[[object, object], dict[str, float]] | None = None


def blocks_to_batches(blocks: torch.Tensor, batch_size: int) -> list[Batch]:
    """Unpadded token blocks; every position but the last predicts the next token."""
    batches = []
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start:start + batch_size]
        target = torch.ones_like(ids)
        target[:, -1] = 0
        batches.append(Batch(ids, torch.ones_like(ids), target))
    return batches




def pad_sequences(sequences: list[list[int]], targets: list[list[int]], pad_id: int) -> Batch:
    """Right-pad token lists into one Batch; `targets[i]` lists the positions of sequence i whose
    NEXT token is scored."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    target = torch.zeros_like(ids)
    for row, (seq, positions) in enumerate(zip(sequences, targets)):
        ids[row, :len(seq)] = torch.tensor(seq)
        attention[row, :len(seq)] = 1
        target[row, positions] = 1
    return Batch(ids, attention, target)
