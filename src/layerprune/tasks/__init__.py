"""Evaluation tasks: one registry, one engine, per-task statistics.

Task scores (all higher is better; quality retained is the mean of score /
the teacher's score over the tasks it names):
- perplexity: 1 / perplexity; token_accuracy: share of next tokens predicted exactly;
- kl: exp(-mean per-token KL(teacher || model)), 1.0 for the teacher itself;
- continuation, mc:FILE: choice accuracy (choice.py);
- copy, copy_generate: copying (copying.py), through the chat template where there is one
  (copy:plain, copy_generate:plain: the plain prompt); lm_eval:NAME[@DIR]: lm-eval (lm_eval.py);
- bench, mmlu: the benchmark suites through lm-eval, offline (suite.py): the mean of the tasks'
  table metrics, each task's beside it, and against the teacher its retention with a paired
  interval (retention.py).
The same task objects serve the `quality` importance metric (on calibration
text) and evaluation (on held-out text).
"""

from __future__ import annotations

from typing import Callable

from ..errors import LayerpruneError
from . import choice, copying, lm_eval
from .base import Batch, Task, TaskData, blocks_to_batches
from .engine import MomentsMemo, collect_stats, evaluate_tasks, forward_logits, my_share, quality_retained, summaries
from .retention import retention, task_score
from .suite import SUITES, ItemResults, data_root, request_for, run_suite
from .suite_cache import original_results
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
}
# Tasks that take an argument after a colon: "mc:questions.jsonl".
PARAMETRIC_TASKS: dict[str, Callable[[TaskData, str], Task]] = {
    "mc": choice.build_mc,
    "lm_eval": lm_eval.build_lm_eval,
    "copy": copying.build_copy,                     # copy:plain, the plain prompt on any model
    "copy_generate": copying.build_copy_generate,
}
# Tasks that draw no items (every block is scored): their figures do not depend on the seed.
SEEDLESS_TASKS = ("perplexity", "token_accuracy", "kl")
# Tasks that run whole (generate, or go through lm-eval), so they cannot score importance from
# one forward pass.
GENERATIVE_TASKS = ("copy_generate", "lm_eval")


def check_task_name(name: str, for_importance: bool = False) -> None:
    base, colon, arg = name.partition(":")
    known = name in TASKS or name in SUITES or (colon and base in PARAMETRIC_TASKS and arg)
    if not known:
        listed = ", ".join([*SUITES, *TASKS, *(f"{p}:ARG" for p in PARAMETRIC_TASKS)])
        raise LayerpruneError(f"unknown task {name!r}", f"use one of {listed}")
    if colon and base in ("copy", "copy_generate"):
        copying.check_prompt(arg)
    if for_importance and base in GENERATIVE_TASKS:
        raise LayerpruneError(f"task {name!r} generates text, so it cannot score layer importance",
                              "use it in --eval-tasks; for importance use copy (its teacher-forced form)")


def build_tasks(names, data: TaskData) -> list[Task]:
    tasks = []
    for name in names:
        base, colon, arg = name.partition(":")
        if name in SUITES:
            tasks.append(build_suite(name, data))
        else:
            tasks.append(PARAMETRIC_TASKS[base](data, arg) if colon else TASKS[name](data))
    return tasks


def build_suite(name: str, data: TaskData) -> Task:
    """A suite as a task that runs whole: its score is the mean of its tasks' table metrics; the
    teacher's per-item results come from the cache (suite_cache.py), and a model other than the
    teacher also gets each task's and the suite's retention with their paired intervals."""
    bench = data.bench
    if bench is None:
        raise ValueError("a benchmark suite task needs TaskData.bench (the run's BenchConfig)")
    data_root()
    request = request_for((name,), bench.items or None, bench.calibration, side=bench.side)

    def run(model, teacher=None) -> dict[str, float]:
        if model is teacher:
            return _suite_summary(original_results(model, data.tokenizer, request, None, bench.cache), None)
        items = run_suite(model, data.tokenizer, request)
        kept = None if teacher is None else original_results(teacher, data.tokenizer, request, None,
                                                             bench.cache)
        return _suite_summary(items, kept)

    return Task(name, [], None, None, run=run)


def _suite_summary(items: ItemResults, original: ItemResults | None) -> dict[str, float]:
    scores = {task: task_score(items, task)["score"] for task in items.tasks}
    summary = {"score": sum(scores.values()) / len(scores), **scores}
    if original is not None:
        figures = retention(items, original)
        suite = figures["suite"]
        summary.update(retention=suite["ratio_of_means"], retention_low=suite["ratio_of_means_interval"][0],
                       retention_high=suite["ratio_of_means_interval"][1])
        if "chance_corrected" in suite:
            summary["chance_corrected"] = suite["chance_corrected"]
    return summary


__all__ = ["Batch", "Task", "TaskData", "TASKS", "blocks_to_batches", "build_tasks", "check_task_name",
           "collect_stats", "evaluate_tasks", "forward_logits", "my_share", "quality_retained", "summaries",
           "nll_stats", "perplexity_summary"]
