"""What a run measures against, built once and never changed (`RunInputs`), and measuring a
student against it.

The teacher, its tokenizer, the corpus (calibration, held-out, patch and training text), the
importance, evaluation and final-suite tasks, and the teacher's own scores on them. Everything
the model or the data cannot do (an architecture no cut or patch suits, blocks longer than the
context, a task the text cannot feed) fails while these are built, before any heavy work.
A comparison builds one set and runs every variant on it.
"""

from __future__ import annotations

import dataclasses

import logging
import time
from dataclasses import dataclass

import torch

from .checkpoint import Evaluation
from .config import Recipe
from .data import Corpus, load_corpus
from .importance import check_metric
from .models import check_context
from .patch import effective_kind
from .surgery import check_cut_supported
from .healing.targets import check_budgets
from .tasks import Task, TaskData, blocks_to_batches, build_tasks, check_task_name, evaluate_tasks, quality_retained
from .tasks.interval import bootstrap_interval, evaluate_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInputs:
    """Built once per run and never changed: the teacher, the data, the tasks, the teacher's scores."""

    teacher: torch.nn.Module
    tokenizer: object
    corpus: Corpus
    calib_batches: list
    importance_tasks: list[Task]
    eval_tasks: list[Task]
    final_tasks: list[Task]
    teacher_scores: dict   # on the importance tasks (calibration text), for the quality metric
    teacher_eval: dict     # on the evaluation tasks (held-out text)
    teacher_rows: dict | None = None   # their statistics per held-out block, for intervals (None: not per block)


def check_names(config: Recipe, metric: str | None, final_tasks=()) -> None:
    """Registry names, checked before any model is loaded."""
    if metric is not None:
        check_metric(metric)
    for name in config.tasks:
        check_task_name(name, for_importance=True)
    for name in (*config.eval_tasks, *final_tasks):
        check_task_name(name)


def build_inputs(config: Recipe, teacher, tokenizer, final_tasks=(), teacher_scores: bool = True,
                 patch_pool: bool | None = None) -> RunInputs:
    """Everything the loop measures against, from the loaded teacher. `teacher_scores`: score the
    teacher on the importance tasks (the quality metric needs them); `patch_pool`: hold the patch
    text (default: when `config.patch` fits one; a comparison asks for it when any variant does)."""
    check_cut_supported(teacher)
    effective_kind(teacher, config.patch)
    check_context(teacher, config.data.seq_len)
    check_budgets(config.heal, teacher, config.data.seq_len)
    patching = config.patch != "none" if patch_pool is None else patch_pool
    corpus = load_corpus(config.data, tokenizer, patch_pool=patching)
    bs = config.data.batch_size
    # a suite among the importance tasks scores candidates on items of its calibration share, never evaluated
    choice = dataclasses.replace(config.bench, side="calibration", items=config.bench.choice_items)
    importance = build_tasks(config.tasks, TaskData(tokenizer, corpus.blocks["calib"], corpus.docs["calib"], bs,
                                                    config.seed, choice))
    eval_data = TaskData(tokenizer, corpus.blocks["eval"], corpus.docs["eval"], bs, config.seed, config.bench)
    eval_tasks = build_tasks(config.eval_tasks, eval_data)
    # Built now so that a task the data cannot feed fails before any work, not at the end.
    suite = build_tasks(dict.fromkeys((*config.eval_tasks, *final_tasks)), eval_data)
    log.info("the original's figures on held-out text: %s, %d blocks", ", ".join(t.name for t in eval_tasks),
             len(corpus.blocks["eval"]))
    teacher_eval, teacher_rows = scores_and_rows(teacher, eval_tasks, teacher)
    return RunInputs(teacher, tokenizer, corpus, blocks_to_batches(corpus.blocks["calib"], bs), importance,
                     eval_tasks, suite, evaluate_tasks(teacher, importance, teacher) if teacher_scores else {},
                     teacher_eval, teacher_rows)


def scores_and_rows(model, tasks: list[Task], teacher) -> tuple[dict, dict | None]:
    """Task summaries, and per-block statistics where the tasks have them."""
    rowed = evaluate_rows(model, tasks, teacher)
    return rowed if rowed is not None else (evaluate_tasks(model, tasks, teacher), None)


def evaluate_student(inputs: RunInputs, student) -> Evaluation:
    """The student on the evaluation tasks (held-out text): its quality retained, with the 95%
    interval over held-out blocks where the tasks allow one."""
    scores, rows = scores_and_rows(student, inputs.eval_tasks, inputs.teacher)
    interval = bootstrap_interval(rows, inputs.teacher_rows, inputs.eval_tasks) if rows and inputs.teacher_rows \
        else None
    return Evaluation(scores, quality_retained(scores, inputs.teacher_eval), [t.name for t in inputs.eval_tasks],
                      interval)


def final_evaluation(inputs: RunInputs, student, held_out: Evaluation | None = None
                     ) -> tuple[Evaluation, Evaluation, dict]:
    """The final model on the evaluation tasks and on the whole final suite, and the teacher's
    suite scores (its per-iteration scores are reused: the teacher never changes). `held_out`:
    the evaluation tasks' figures of this very student when already measured (the last
    iteration's, with no final healing after it), so they are not measured twice."""
    started = time.perf_counter()
    unseen = [task for task in inputs.final_tasks if task.name not in inputs.teacher_eval]
    if unseen:
        log.info("final evaluation of the original: %s on held-out text", ", ".join(task.name for task in unseen))
    teacher = {**inputs.teacher_eval, **evaluate_tasks(inputs.teacher, unseen, inputs.teacher)}
    teacher = {task.name: teacher[task.name] for task in inputs.final_tasks}
    log.info("final evaluation of the pruned model: %s on held-out text",
             ", ".join(task.name for task in inputs.final_tasks))
    held_out = held_out or evaluate_student(inputs, student)
    rest = [task for task in inputs.final_tasks if task.name not in held_out.tasks]
    scores = {**held_out.tasks, **evaluate_tasks(student, rest, inputs.teacher)}
    suite = {task.name: scores[task.name] for task in inputs.final_tasks}
    log.info("final evaluation done in %.0fs", time.perf_counter() - started)
    return held_out, Evaluation(suite, quality_retained(suite, teacher), list(suite)), teacher
