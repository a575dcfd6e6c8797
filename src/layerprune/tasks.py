"""Evaluation tasks and the one "quality retained" aggregate.

A task is a fixed list of batches plus two pure functions: `stats` turns one
batch's logits into additive sums (so scores over many batches, and over many
candidate models at once, are just sums), and `summary` turns the sums into
numbers whose "score" is higher-is-better. The same task objects serve the
`quality` importance metric (on calibration text) and evaluation (on held-out
text).

Quality retained (used everywhere) = the mean over tasks of
score(model) / score(teacher). Task scores:
- perplexity: 1 / perplexity, so retained = ppl_teacher / ppl_model;
- token_accuracy: share of next tokens predicted exactly (argmax);
- kl: exp(-mean per-token KL(teacher || model)), 1.0 for the teacher itself;
- continuation, copy, copy_generate, mmlu, mc:FILE: see choice_tasks.py.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from . import choice_tasks, lm_eval_tasks
from .batches import Batch, Task, blocks_to_batches
from .errors import LayerpruneError
from .logprobs import accuracy_stats, accuracy_summary, next_token_logprobs, token_kl


def nll_stats(logits, batch, teacher_logits=None) -> dict[str, float]:
    scored = batch.target_mask[:, :-1].bool()
    nll = -next_token_logprobs(logits, batch.input_ids)[scored]
    return {"nll_sum": nll.sum().item(), "tokens": float(scored.sum().item())}


def perplexity_summary(s: dict[str, float]) -> dict[str, float]:
    nll = s["nll_sum"] / max(s["tokens"], 1.0)
    return {"score": math.exp(-nll), "perplexity": math.exp(nll), "nll": nll}


def kl_stats(logits, batch, teacher_logits) -> dict[str, float]:
    mask = batch.attention_mask.bool()
    return {"kl_sum": token_kl(logits, teacher_logits)[mask].sum().item(), "tokens": float(mask.sum().item())}


def kl_summary(s: dict[str, float]) -> dict[str, float]:
    kl = s["kl_sum"] / max(s["tokens"], 1.0)
    return {"score": math.exp(-kl), "kl": kl}


def build_perplexity(ctx: "TaskData") -> Task:
    return Task("perplexity", ctx.block_batches, nll_stats, perplexity_summary)


def build_token_accuracy(ctx: "TaskData") -> Task:
    return Task("token_accuracy", ctx.block_batches, accuracy_stats, accuracy_summary)


def build_kl(ctx: "TaskData") -> Task:
    return Task("kl", ctx.block_batches, kl_stats, kl_summary, needs_teacher=True)


@dataclass
class TaskData:
    """What task builders draw on: one split's token blocks and documents."""

    tokenizer: object
    blocks: torch.Tensor
    docs: list[str]
    batch_size: int
    seed: int = 0

    @functools.cached_property
    def block_batches(self) -> list[Batch]:
        """One shared list, so tasks on the same blocks share each forward pass."""
        return blocks_to_batches(self.blocks, self.batch_size)


TASKS: dict[str, Callable[[TaskData], Task]] = {
    "perplexity": build_perplexity,
    "token_accuracy": build_token_accuracy,
    "kl": build_kl,
    "continuation": choice_tasks.build_continuation,
    "copy": choice_tasks.build_copy,
    "copy_generate": choice_tasks.build_copy_generate,
    "mmlu": choice_tasks.build_mmlu,
}
# Tasks that take an argument after a colon: "mc:questions.jsonl".
PARAMETRIC_TASKS: dict[str, Callable[[TaskData, str], Task]] = {
    "mc": choice_tasks.build_mc,
    "lm_eval": lm_eval_tasks.build_lm_eval,
}
# Tasks that run whole (generate, or go through lm-eval), so they cannot score importance from
# one forward pass.
GENERATIVE_TASKS = ("copy_generate", "lm_eval")


def check_task_name(name: str, for_importance: bool = False) -> None:
    base, colon, arg = name.partition(":")
    known = name in TASKS or (colon and base in PARAMETRIC_TASKS and arg)
    if not known:
        listed = ", ".join([*TASKS, *(f"{p}:ARG" for p in PARAMETRIC_TASKS)])
        raise LayerpruneError(f"unknown task {name!r}", f"use one of {listed}")
    if for_importance and base in GENERATIVE_TASKS:
        raise LayerpruneError(f"task {name!r} generates text, so it cannot score layer importance",
                              "use it in --eval-tasks; for importance use copy (its teacher-forced form)")


def build_tasks(names, data: TaskData) -> list[Task]:
    tasks = []
    for name in names:
        base, colon, arg = name.partition(":")
        tasks.append(PARAMETRIC_TASKS[base](data, arg) if colon else TASKS[name](data))
    return tasks


def add_stats(total: dict[str, float], new: dict[str, float]) -> None:
    for key, value in new.items():
        total[key] = total.get(key, 0.0) + value


def _to(batch: Batch, device) -> Batch:
    return Batch(batch.input_ids.to(device), batch.attention_mask.to(device), batch.target_mask.to(device),
                 {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.extra.items()})


@torch.no_grad()
def forward_logits(model, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits


def group_by_batches(tasks: list[Task]) -> list[tuple[list[Batch], list[Task]]]:
    """Tasks that share one batch list, so each batch runs through a model once for all of them."""
    groups: dict[int, tuple[list[Batch], list[Task]]] = {}
    for task in tasks:
        groups.setdefault(id(task.batches), (task.batches, []))[1].append(task)
    return list(groups.values())


@torch.no_grad()
def evaluate_tasks(model, tasks: list[Task], teacher=None) -> dict[str, dict[str, float]]:
    """Summaries per task for one model; tasks that compare with a teacher need `teacher`."""
    device = next(model.parameters()).device
    totals: dict[str, dict[str, float]] = {task.name: {} for task in tasks}
    ran = {task.name: task.run(model, teacher) for task in tasks if task.run is not None}
    for batches, group in group_by_batches([task for task in tasks if task.run is None]):
        needs_teacher = any(task.needs_teacher for task in group)
        if needs_teacher and teacher is None:
            raise ValueError(f"tasks {[t.name for t in group]} need a teacher model")
        for batch in batches:
            batch = _to(batch, device)
            teacher_logits = forward_logits(teacher, batch) if needs_teacher else None
            logits = forward_logits(model, batch)
            for task in group:
                add_stats(totals[task.name], task.stats(logits, batch, teacher_logits))
    return {task.name: ran[task.name] if task.name in ran else task.summary(totals[task.name]) for task in tasks}


def quality_retained(scores: dict[str, dict[str, float]], reference: dict[str, dict[str, float]]) -> float:
    """Mean over tasks of score / reference score (the teacher's)."""
    ratios = [scores[name]["score"] / reference[name]["score"] for name in scores if reference[name]["score"] > 0]
    return sum(ratios) / len(ratios) if ratios else float("nan")
