"""How sure a quality retained is: a paired bootstrap over held-out blocks.

The statistics of each held-out block are kept apart (`evaluate_rows`), for the model and for
the teacher alike. A resample draws blocks with replacement, sums both sides' statistics over
the same draw, and takes quality retained of the sums; the 2.5th and 97.5th percentiles of
DRAWS resamples are the 95% interval. The block is the unit: held-out blocks are read
round-robin, one window of every held-out document before a second, so the interval says how
much the figure would move on other text of the same kind, and it is wide when there are few
blocks. Tasks that score answer choices or generate text have no per-block statistics: a
quality retained that averages one of them gets no interval.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Task
from ..processes import process_count
from .engine import TeacherSide, add_stats, each_row, evaluation_bar, forward_output, my_share, quality_retained

DRAWS = 1000


def _blockwise(tasks: list[Task]) -> bool:
    """Every task scores the same plain token blocks, one forward pass each."""
    if not tasks or any(task.run is not None for task in tasks):
        return False
    batches = tasks[0].batches
    return all(task.batches is batches for task in tasks) and not any(batch.extra for batch in batches)


@torch.no_grad()
def evaluate_rows(model, tasks: list[Task], teacher=None) -> tuple[dict, dict[str, list[dict]]] | None:
    """(summaries per task, statistics per task per block in block order), or None where the
    tasks are not all scored on the same plain blocks (evaluate_tasks then)."""
    from accelerate.utils import gather_object

    if not _blockwise(tasks):
        return None
    device = next(model.parameters()).device
    batches = tasks[0].batches
    mine: list[tuple[int, dict[str, list[dict]]]] = []
    with TeacherSide(model, tasks, teacher) as teaching:
        for (index, batch), counts in evaluation_bar(my_share(list(enumerate(batches)), model), tasks):
            batch = batch.to(device)
            out = forward_output(model, batch, teaching.by_rows(batch))
            rows = _row_stats(tasks, model, out, batch, teaching.of(teaching.for_batch(index, batch, out), out))
            if counts:
                mine.append((index, rows))
            del out   # not held while the next batch runs
    parts = gather_object(mine) if process_count() > 1 else mine
    ordered = [rows for _, rows in sorted(parts, key=lambda part: part[0])]
    per_task = {task.name: [row for rows in ordered for row in rows[task.name]] for task in tasks}
    sums: dict[str, dict] = {}
    for task in tasks:
        total: dict[str, float] = {}
        for row in per_task[task.name]:
            add_stats(total, row)
        sums[task.name] = task.summary(total)
    return sums, per_task


def _row_stats(tasks: list[Task], model, out, batch, side) -> dict[str, list[dict]]:
    """{task: statistics of each row of `batch`}. Its own function so that no loop variable keeps
    a row of `out` (a view: the whole batch's logits) alive once it returns."""
    rows: dict[str, list[dict]] = {task.name: [] for task in tasks}
    for logits, row, row_side in each_row(model, out, batch, side):
        for task in tasks:
            rows[task.name].append(task.stats(logits, row, row_side))
    return rows


def bootstrap_interval(rows: dict[str, list[dict]], teacher_rows: dict[str, list[dict]], tasks: list[Task],
                       draws: int = DRAWS, seed: int = 0) -> list[float] | None:
    """The 95% interval of quality retained over `tasks`, resampling blocks (paired: the same
    draw for the model and the teacher). None without per-block statistics for every task."""
    names = [task.name for task in tasks]
    if not names or any(name not in rows or name not in teacher_rows for name in names):
        return None
    count = len(rows[names[0]])
    if count < 2:
        return None
    rng = np.random.default_rng(seed)
    keys = {name: sorted(rows[name][0]) for name in names}
    arrays = {side: {name: np.array([[row[key] for key in keys[name]] for row in source[name]])
                     for name in names} for side, source in (("model", rows), ("teacher", teacher_rows))}
    qualities = []
    for _ in range(draws):
        draw = rng.integers(0, count, count)
        summed = {side: {task.name: task.summary(dict(zip(keys[task.name], arrays[side][task.name][draw].sum(0))))
                         for task in tasks} for side in arrays}
        qualities.append(quality_retained(summed["model"], summed["teacher"]))
    low, high = np.nanpercentile(qualities, [2.5, 97.5])
    return [float(low), float(high)]
