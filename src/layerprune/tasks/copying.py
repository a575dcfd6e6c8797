"""Copying tasks (the paper's document and paragraph copying).

- copy: share of a paragraph's tokens predicted exactly when the model is asked to repeat it,
  teacher-forced (a fast stand-in for the generated form, usable by the importance metric);
- copy_generate: longest common subsequence of the greedily generated copy and the paragraph,
  over the paragraph's length (the paper's copying score; evaluation only).
Each draws its paragraphs with a fixed seed, so every model sees the same items.
"""

from __future__ import annotations

import random

import torch

from .base import Task, pad_sequences
from .choice import doc_tokens, token_ids
from .stats import accuracy_stats, accuracy_summary

COPY_SAMPLES, COPY_TOKENS = 16, 32


def _copy_items(ctx) -> list[tuple[list[int], list[int]]]:
    """(prompt ids ending where the copy starts, paragraph ids)."""
    rng = random.Random(ctx.seed + 1)
    docs = doc_tokens(ctx, COPY_TOKENS)
    head, tail = token_ids(ctx.tokenizer, "Repeat the text exactly.\nText: "), token_ids(ctx.tokenizer, "\nRepeat: ")
    items = []
    for _ in range(COPY_SAMPLES):
        doc = docs[rng.randrange(len(docs))]
        at = rng.randrange(len(doc) - COPY_TOKENS + 1)
        paragraph = doc[at:at + COPY_TOKENS]
        items.append((head + paragraph + tail, paragraph))
    return items


def build_copy(ctx) -> Task:
    sequences, targets = [], []
    for prompt, paragraph in _copy_items(ctx):
        sequences.append(prompt + paragraph)
        targets.append(list(range(len(prompt) - 1, len(prompt) + len(paragraph) - 1)))
    pad = ctx.tokenizer.pad_token_id or 0
    batches = [pad_sequences(sequences[i:i + ctx.batch_size], targets[i:i + ctx.batch_size], pad)
               for i in range(0, len(sequences), ctx.batch_size)]
    return Task("copy", batches, accuracy_stats, accuracy_summary)


def lcs_length(a: list[int], b: list[int]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def build_copy_generate(ctx) -> Task:
    items = _copy_items(ctx)
    pad = ctx.tokenizer.pad_token_id or 0

    @torch.no_grad()
    def run(model, teacher=None) -> dict[str, float]:
        device = next(model.parameters()).device
        total = 0.0
        for prompt, paragraph in items:
            ids = torch.tensor([prompt], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(paragraph),
                                 do_sample=False, pad_token_id=pad)
            total += lcs_length(out[0, len(prompt):].tolist(), paragraph) / len(paragraph)
        return {"score": total / len(items), "samples": float(len(items))}

    return Task("copy_generate", [], None, None, run=run)


