"""What every task is made of: batches of token ids with the positions to score.

A Batch says which next tokens count (`target_mask`), so one scorer serves
running text, answer choices and copied paragraphs alike. A Task is a fixed
list of batches plus two pure functions: `stats` turns one batch's logits
into additive sums (so scores over many batches, and over many candidate
models at once, are just sums) and `summary` turns the sums into numbers
whose "score" is higher-is-better.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor          # [B, T]
    attention_mask: torch.Tensor     # [B, T], 1 = real token
    target_mask: torch.Tensor        # [B, T], 1 = position whose next token is scored
    extra: dict = field(default_factory=dict)

    def row(self, r: int) -> "Batch":
        """Row r alone, as a batch of one (plain token rows: no `extra`)."""
        return Batch(self.input_ids[r:r + 1], self.attention_mask[r:r + 1], self.target_mask[r:r + 1])

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device),
                     {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.extra.items()})


@dataclass
class Task:
    name: str
    batches: list[Batch]
    stats: Callable[[torch.Tensor, Batch, torch.Tensor | None], dict[str, float]] | None
    summary: Callable[[dict[str, float]], dict[str, float]] | None
    needs_teacher: bool = False
    # Tasks that generate text cannot be scored from one forward pass: they run whole, given
    # (model, teacher), and are for evaluation only, never for the importance metric.
    run: Callable[[object, object], dict[str, float]] | None = None
    # Where the teacher's side is its moments through the LM head (moments.py): kept per batch, so
    # the teacher runs on these batches once for all the evaluations of a run.
    memo: object | None = field(default=None, repr=False, compare=False)


@dataclass
class TaskData:
    """What task builders draw on: one split's token blocks and documents."""

    tokenizer: object
    blocks: torch.Tensor
    docs: list[str]
    batch_size: int
    seed: int = 0
    bench: object | None = None    # the run's BenchConfig, for the benchmark suites
    copy_samples: int | None = None   # copy_generate's items (None: copying.GENERATE_SAMPLES)

    @functools.cached_property
    def block_batches(self) -> list[Batch]:
        """One shared list, so tasks on the same blocks share each forward pass."""
        return blocks_to_batches(self.blocks, self.batch_size)


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
