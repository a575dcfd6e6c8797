"""Evaluation tasks: one registry, one engine, per-task statistics.

Task scores (all higher is better; quality retained is the mean of score /
the teacher's score over the tasks it names):
- perplexity: 1 / perplexity; token_accuracy: share of next tokens predicted exactly;
- kl: exp(-mean per-token KL(teacher || model)), 1.0 for the teacher itself;
- continuation, mmlu, mc:FILE: choice accuracy (choice.py);
- copy, copy_generate: copying (copying.py); lm_eval:NAME[@DIR]: lm-eval (lm_eval.py).
The same task objects serve the `quality` importance metric (on calibration
text) and evaluation (on held-out text).
"""

from __future__ import annotations

from typing import Callable

from ..errors import LayerpruneError
from . import choice, copying, lm_eval
from .base import Batch, Task, TaskData, blocks_to_batches
from .moments import MomentsMemo
from .engine import collect_stats, evaluate_tasks, forward_logits, my_share, quality_retained, summaries
from .stats import accuracy_stats, accuracy_summary, kl_stats, kl_summary, nll_stats, perplexity_summary


def build_perplexity(ctx: TaskData) -> Task:
    return Task("perplexity", ctx.block_batches, nll_stats, perplexity_summary)


def build_token_accuracy(ctx: TaskData) -> Task:
    return Task("token_accuracy", ctx.block_batches, accuracy_stats, accuracy_summary)


def build_kl(ctx: TaskData) -> Task:
    return Task("kl", ctx.block_batches, kl_stats, kl_summary, needs_teacher=True, memo=MomentsMemo())


TASKS: dict[str, Callable[[TaskData], Task]] = {
    "perplexity": build_perplexity,
    "token_accuracy": build_token_accuracy,
    "kl": build_kl,
    "continuation": choice.build_continuation,
    "copy": copying.build_copy,
    "copy_generate": copying.build_copy_generate,
    "mmlu": choice.build_mmlu,
}
# Tasks that take an argument after a colon: "mc:questions.jsonl".
PARAMETRIC_TASKS: dict[str, Callable[[TaskData, str], Task]] = {
    "mc": choice.build_mc,
    "lm_eval": lm_eval.build_lm_eval,
}
# Tasks that draw no items (every block is scored): their figures do not depend on the seed.
SEEDLESS_TASKS = ("perplexity", "token_accuracy", "kl")
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


__all__ = ["Batch", "Task", "TaskData", "TASKS", "blocks_to_batches", "build_tasks", "check_task_name",
           "collect_stats", "evaluate_tasks", "forward_logits", "my_share", "quality_retained", "summaries",
           "nll_stats", "perplexity_summary"]
