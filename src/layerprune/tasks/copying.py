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


def _until_end(tokens: list[int], model) -> list[int]:
    """A generated row up to its end-of-text token: in a batch, rows that ended are padded on."""
    ends = model.generation_config.eos_token_id
    ends = set(ends if isinstance(ends, list) else [] if ends is None else [ends])
    for at, token in enumerate(tokens):
        if token in ends:
            return tokens[:at + 1]
    return tokens


def build_copy_generate(ctx) -> Task:
    items = _copy_items(ctx)
    pad = ctx.tokenizer.pad_token_id or 0

    # Items of one prompt length generate together, unpadded: one item at a time, generate's
    # per-token overhead made this task a third of the final suite's time.
    by_length: dict[tuple[int, int], list[tuple[list[int], list[int]]]] = {}
    for prompt, paragraph in items:
        by_length.setdefault((len(prompt), len(paragraph)), []).append((prompt, paragraph))

    @torch.no_grad()
    def run(model, teacher=None) -> dict[str, float]:
        device = next(model.parameters()).device
        total = 0.0
        for (length, new), group in by_length.items():
            ids = torch.tensor([prompt for prompt, _ in group], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 do_sample=False, pad_token_id=pad)
            total += sum(lcs_length(_until_end(row[length:].tolist(), model), paragraph) / len(paragraph)
                         for row, (_, paragraph) in zip(out, group))
        return {"score": total / len(items), "samples": float(len(items))}

    return Task("copy_generate", [], None, None, run=run)


