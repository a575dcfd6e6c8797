"""Tasks that pick among answers: multiple choice (mc:FILE) and continuation choice.

Scores and scales (all higher is better, 1.0 at most):
- mc:FILE: accuracy of picking the right answer by the mean log-probability of each
  answer's tokens after the question (chance is 1 / number of choices);
- continuation: accuracy of picking a passage's true continuation among continuations taken
  from other documents (chance 1/4);
Each draws `samples` items with a fixed seed, so every model sees the same items.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from ..errors import LayerpruneError
from .base import Batch, Task, pad_sequences
from .stats import next_token_logprobs

CHOICE_SAMPLES, QUESTIONS_PER_BATCH = 32, 2
CONTEXT_TOKENS, CONTINUATION_TOKENS, MAX_TOKENS = 64, 16, 384


def choice_stats(logits, batch: Batch, teacher_logits=None) -> dict[str, float]:
    """Pick, per question, the choice with the highest mean log-probability of its tokens."""
    logp = next_token_logprobs(logits, batch.input_ids)
    mask = batch.target_mask[:, :-1].to(logp.dtype)
    mean = (logp * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    picks = mean.view(-1, batch.extra["n_choices"]).argmax(-1)
    return {"correct": float((picks == batch.extra["answers"]).sum()), "questions": float(len(picks))}


def choice_summary(s: dict[str, float]) -> dict[str, float]:
    return {"score": s["correct"] / max(s["questions"], 1.0), "questions": s["questions"]}


def choice_batches(items: list[tuple[list[int], list[list[int]], int]], pad_id: int) -> list[Batch]:
    """items: (context ids, [choice ids], answer index); all choices of a question share a batch."""
    batches = []
    n_choices = len(items[0][1])
    for start in range(0, len(items), QUESTIONS_PER_BATCH):
        sequences, targets, answers = [], [], []
        for context, choices, answer in items[start:start + QUESTIONS_PER_BATCH]:
            if len(choices) != n_choices:
                raise LayerpruneError("multiple-choice items have different numbers of choices",
                                      "give every question the same number of choices")
            for choice in choices:
                context = context[-(MAX_TOKENS - len(choice)):]
                sequences.append(context + choice)
                targets.append(list(range(len(context) - 1, len(context) + len(choice) - 1)))
            answers.append(answer)
        batch = pad_sequences(sequences, targets, pad_id)
        batch.extra = {"answers": torch.tensor(answers), "n_choices": n_choices}
        batches.append(batch)
    return batches


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def questions_task(name: str, tokenizer, questions: list[dict], samples: int, seed: int) -> Task:
    """questions: {"question", "choices", "answer" (index)} dicts."""
    if not questions:
        raise LayerpruneError(f"task {name} has no questions", "give a jsonl file with question/choices/answer")
    rng = random.Random(seed)
    chosen = rng.sample(questions, min(samples, len(questions)))
    items = [(token_ids(tokenizer, f"Question: {q['question']}\nAnswer:"),
              [token_ids(tokenizer, f" {c}") for c in q["choices"]], int(q["answer"])) for q in chosen]
    return Task(name, choice_batches(items, tokenizer.pad_token_id or 0), choice_stats, choice_summary)


def read_questions(path: Path) -> list[dict]:
    """A jsonl of {"question": str, "choices": [str], "answer": int or letter}."""
    if not path.is_file():
        raise LayerpruneError(f"multiple-choice file {path} does not exist", "check the path after mc:")
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            choices = list(record["choices"])
            answer = record["answer"]
            answer = "ABCDEFGHIJ".index(answer) if isinstance(answer, str) else int(answer)
            assert 0 <= answer < len(choices)
        except (ValueError, KeyError, TypeError, AssertionError) as err:
            raise LayerpruneError(f"{path} line {number} is not a question with choices and an answer ({err})",
                                  'write {"question": ..., "choices": [...], "answer": index}') from err
        questions.append({"question": record["question"], "choices": choices, "answer": answer})
    return questions


def doc_tokens(ctx, minimum: int) -> list[list[int]]:
    docs = [ids for ids in (token_ids(ctx.tokenizer, d) for d in ctx.docs) if len(ids) >= minimum]
    if len(docs) < 2:
        raise LayerpruneError(f"the text has too few documents of {minimum}+ tokens for this task",
                              "give more or longer documents")
    return docs


def build_continuation(ctx) -> Task:
    rng = random.Random(ctx.seed)
    docs = doc_tokens(ctx, CONTEXT_TOKENS + CONTINUATION_TOKENS)
    items = []
    for _ in range(CHOICE_SAMPLES):
        d = rng.randrange(len(docs))
        at = rng.randrange(len(docs[d]) - CONTEXT_TOKENS - CONTINUATION_TOKENS + 1)
        context = docs[d][at:at + CONTEXT_TOKENS]
        true = docs[d][at + CONTEXT_TOKENS:at + CONTEXT_TOKENS + CONTINUATION_TOKENS]
        others = [i for i in range(len(docs)) if i != d]
        choices = [true]
        for o in (rng.choice(others) for _ in range(3)):
            off = rng.randrange(len(docs[o]) - CONTINUATION_TOKENS + 1)
            choices.append(docs[o][off:off + CONTINUATION_TOKENS])
        order = list(range(4))
        rng.shuffle(order)
        items.append((context, [choices[i] for i in order], order.index(0)))
    return Task("continuation", choice_batches(items, ctx.tokenizer.pad_token_id or 0), choice_stats, choice_summary)


def build_mc(ctx, path: str) -> Task:
    return questions_task(f"mc:{path}", ctx.tokenizer, read_questions(Path(path)), CHOICE_SAMPLES * 2, ctx.seed)
