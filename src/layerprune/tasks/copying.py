"""Copying tasks (the paper's document and paragraph copying).

- copy: share of a paragraph's tokens predicted exactly when the model is asked to repeat it,
  teacher-forced (a fast stand-in for the generated form, usable by the importance metric);
- copy_generate: longest common subsequence of the greedily generated copy and the paragraph,
  over the paragraph's length (the paper's copying score; evaluation only), on enough items that
  its retention against the original carries a paired interval a claim can rest on.
Each draws its paragraphs with a fixed seed, so every model sees the same items.

The request goes the way the model's users send it: through the chat template where the
tokenizer has one, as a plain prompt otherwise. `copy:plain` and `copy_generate:plain` always
send the plain prompt (what these tasks sent every model before 2026-12-07).
"""

from __future__ import annotations

import random
import weakref
from dataclasses import dataclass

import torch

from ..errors import LayerpruneError
from .base import Task, pad_sequences
from .choice import doc_tokens, token_ids
from .retention import paired_ratio
from .stats import accuracy_stats, accuracy_summary

COPY_SAMPLES, COPY_TOKENS = 16, 32
# copy_generate's items. On the README's main-job result (SmolLM2, 30 -> 28 layers), 256 items gave
# its retention a 95% paired interval of 0.689 [0.633, 0.750] through the chat template; 384 gave
# 0.655 [0.605, 0.705], the +-0.05 asked for (docs/results.md).
GENERATE_SAMPLES = 384
# Items generated at once: a batch's cache and last logits stay small on a 262K vocabulary.
GENERATE_BATCH = 64
INSTRUCTION, PLAIN_TAIL = "Repeat the text exactly.\nText: ", "\nRepeat: "
MARKER = "\x00paragraph\x00"
PROMPTS = ("", "plain")


def check_prompt(arg: str) -> None:
    if arg not in PROMPTS:
        raise LayerpruneError(f"unknown copying prompt {arg!r}",
                              "use copy_generate (the model's own chat template where it has one) or "
                              "copy_generate:plain (and copy, copy:plain)")


def prompt_parts(tokenizer, plain: bool) -> tuple[list[int], list[int]]:
    """Token ids before and after the paragraph. The chat form renders the template around a
    marker and splits there, so the paragraph's own ids sit unchanged between the two parts (the
    copy is scored against those ids)."""
    if plain or not getattr(tokenizer, "chat_template", None):
        return token_ids(tokenizer, INSTRUCTION), token_ids(tokenizer, PLAIN_TAIL)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": INSTRUCTION + MARKER}], tokenize=False,
                                             add_generation_prompt=True)
    head, tail = rendered.split(MARKER)
    return token_ids(tokenizer, head), token_ids(tokenizer, tail)


def _copy_items(ctx, samples: int = COPY_SAMPLES, plain: bool = False) -> list[tuple[list[int], list[int]]]:
    """(prompt ids ending where the copy starts, paragraph ids). A smaller `samples` draws the
    first items of a larger one."""
    rng = random.Random(ctx.seed + 1)
    docs = doc_tokens(ctx, COPY_TOKENS)
    head, tail = prompt_parts(ctx.tokenizer, plain)
    items = []
    for _ in range(samples):
        doc = docs[rng.randrange(len(docs))]
        at = rng.randrange(len(doc) - COPY_TOKENS + 1)
        paragraph = doc[at:at + COPY_TOKENS]
        items.append((head + paragraph + tail, paragraph))
    return items


def build_copy(ctx, arg: str = "") -> Task:
    check_prompt(arg)
    sequences, targets = [], []
    for prompt, paragraph in _copy_items(ctx, plain=arg == "plain"):
        sequences.append(prompt + paragraph)
        targets.append(list(range(len(prompt) - 1, len(prompt) + len(paragraph) - 1)))
    pad = ctx.tokenizer.pad_token_id or 0
    batches = [pad_sequences(sequences[i:i + ctx.batch_size], targets[i:i + ctx.batch_size], pad)
               for i in range(0, len(sequences), ctx.batch_size)]
    return Task("copy" + (f":{arg}" if arg else ""), batches, accuracy_stats, accuracy_summary)


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


@torch.no_grad()
def copy_scores(model, items: list[tuple[list[int], list[int]]], pad: int) -> list[float]:
    """Each item's score, in item order. Items of one prompt length generate together, unpadded
    (one item at a time, generate's per-token overhead made this task a third of the final
    suite's time), at most GENERATE_BATCH at once."""
    device = next(model.parameters()).device
    by_length: dict[tuple[int, int], list[int]] = {}
    for index, (prompt, paragraph) in enumerate(items):
        by_length.setdefault((len(prompt), len(paragraph)), []).append(index)
    scores = [0.0] * len(items)
    for (length, new), indices in by_length.items():
        for start in range(0, len(indices), GENERATE_BATCH):
            chunk = indices[start:start + GENERATE_BATCH]
            ids = torch.tensor([items[i][0] for i in chunk], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                 pad_token_id=pad)
            for row, i in zip(out, chunk):
                paragraph = items[i][1]
                scores[i] = lcs_length(_until_end(row[length:].tolist(), model), paragraph) / len(paragraph)
    return scores


@dataclass(frozen=True)
class Copying:
    """copy_generate's items (prompt ids, paragraph ids) and the pad id to generate them with."""

    items: list[tuple[list[int], list[int]]]
    pad: int

    def scores(self, model) -> list[float]:
        return copy_scores(model, self.items, self.pad)


def copying_items(ctx, arg: str = "") -> Copying:
    """The items copy_generate (`arg` "plain": copy_generate:plain) scores on `ctx`'s documents:
    the task's, and a comparison's, which keeps every model's per-item scores."""
    check_prompt(arg)
    return Copying(_copy_items(ctx, ctx.copy_samples or GENERATE_SAMPLES, plain=arg == "plain"),
                   ctx.tokenizer.pad_token_id or 0)


def build_copy_generate(ctx, arg: str = "") -> Task:
    """Its summary against the original (given as `teacher`) adds the retention and its 95% paired
    bootstrap interval over items; the original's per-item scores are kept for the task's life,
    so every evaluation of a run generates with the original once."""
    copying = copying_items(ctx, arg)
    kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> its per-item scores

    def scores_of(model) -> list[float]:
        if model not in kept:
            kept[model] = copying.scores(model)
        return kept[model]

    def run(model, teacher=None) -> dict[str, float]:
        scores = scores_of(model) if model is teacher else copying.scores(model)
        summary = {"score": sum(scores) / len(scores), "samples": float(len(scores))}
        if teacher is not None and model is not teacher:
            ratio, (low, high) = paired_ratio(scores, scores_of(teacher))
            summary.update(retention=ratio, retention_low=low, retention_high=high)
        return summary

    return Task("copy_generate" + (f":{arg}" if arg else ""), [], None, None, run=run)
