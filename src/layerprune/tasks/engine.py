"""The one stats-collection loop, shared by evaluation and by candidate scoring.

Tasks that share a batch list are grouped, so each batch runs through a
model once for all of them; the teacher runs once per batch where a task
compares with it. A caller may ask for several model variants per batch
(`outputs`): importance scoring yields the current model and every
candidate "minus layer i" from one set of cached states, and all of their
statistics accumulate here. Quality retained is defined here, once.

Under `accelerate launch` each process runs its share of the batches and the
sums are added across processes (Accelerate's `gather_object`), so every
process holds the same totals and removes the same layer.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Hashable, Iterator
from weakref import WeakKeyDictionary

import torch

from ..activations import FinalState, final_output
from ..heads import head, head_inputs, linear_head, plain_head, same_head
from ..shard import is_sharded
from .base import Batch, Task
from .moments import Moments, teacher_moments

log = logging.getLogger(__name__)

# outputs(batch, rows) yields (variant key, logits) for each model variant scored on the batch; with
# `rows`, the final norm's output (a FinalState) in place of the logits.
Outputs = Callable[[Batch, bool], Iterator[tuple[Hashable, torch.Tensor | FinalState]]]


# A batch's logits larger than this are made a row at a time (256 tokens x 262K: 268 MB on
# Gemma-3), from the final norm's output, by every model: the student's variants in scoring and
# evaluation, the teacher scoring itself and making its moments. On Gemma-3-270M (4 x 256 tokens:
# 1.07 GB a batch) whole batches took a run's peak RSS to 4.56 GB, where its two float32 models
# are 2.14 GB (docs/results.md); SmolLM2's batches (201 MB) stay whole.
ROW_HEAD_BYTES = 1 << 28

_plain_heads: WeakKeyDictionary = WeakKeyDictionary()


@torch.no_grad()
def forward_logits(model, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits


def head_by_rows(model, batch: Batch) -> bool:
    """Whether `batch`'s logits are made a row at a time (`each_row`): plain token rows, whose
    logits would pass ROW_HEAD_BYTES, through a head that is a plain linear map (probed once per
    model)."""
    module = head(model)
    if module is None or batch.extra or len(batch.input_ids) < 2 or \
            batch.input_ids.numel() * module.weight.shape[0] * 4 <= ROW_HEAD_BYTES:
        return False
    if model not in _plain_heads:
        _plain_heads[model] = plain_head(model)
    return _plain_heads[model]


@torch.no_grad()
def forward_output(model, batch: Batch, rows: bool) -> torch.Tensor | FinalState:
    """The batch's logits, or with `rows` the final norm's output (the head not run)."""
    return final_output(model, batch.input_ids, batch.attention_mask, rows)


def each_row(model, out, batch: Batch, side, whole: bool = False):
    """(logits, batch, teacher side) of each row of a model's output on `batch`: a FinalState's rows
    through the model's head, one row's logits at a time (the statistics are sums over rows); with
    `whole`, a logits tensor once as it is."""
    if whole and not isinstance(out, FinalState):
        yield out, batch, side
        return
    module = head(model) if isinstance(out, FinalState) else None
    for r in range(len(batch.input_ids)):
        logits = module(out.h[r:r + 1]) if module is not None else out[r:r + 1]
        yield logits, batch.row(r), None if side is None else side[r:r + 1]
        del logits


def teacher_logits_for(teacher, batch: Batch, model=None, logits: torch.Tensor | None = None) -> torch.Tensor:
    """The teacher's logits on `batch`: the model's own `logits` when the model is the teacher
    (scoring the original against itself runs it once per batch, not twice)."""
    return logits if teacher is model and logits is not None else forward_logits(teacher, batch)


class TeacherSide:
    """What the tasks of one batch list compare with, batch by batch: the teacher's moments kept
    in the tasks' memo when the model shares the teacher's LM head (moments.py), else the
    teacher's logits. Used as a context: it watches the model's head input while moments are in
    use, and `of(...)` gives each model variant's teacher side."""

    def __init__(self, model, tasks: list[Task], teacher):
        needing = [task for task in tasks if task.needs_teacher]
        if needing and teacher is None:
            raise ValueError(f"tasks {[t.name for t in needing]} need a teacher model")
        self.teacher, self.model, self.needed = teacher, model, bool(needing)
        memos = [task.memo for task in needing]
        shared = memos[0] if memos and all(m is memos[0] for m in memos) else None
        # Scoring the teacher against itself: its own forward fills the memo (`keep`).
        self.filling = shared if shared is not None and teacher is model and head(model) is not None \
            and not is_sharded(model) else None
        self.memo = shared if teacher is not model and same_head(model, teacher) else None
        self.record: dict = {}
        self._watch = None

    def __enter__(self) -> "TeacherSide":
        if self.memo is not None or self.filling is not None:
            self._watch = head_inputs(self.model)
            self.record = self._watch.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._watch is not None:
            self._watch.__exit__(*exc)

    def by_rows(self, batch: Batch) -> bool:
        """Whether the model's logits on `batch` are made a row at a time."""
        return head_by_rows(self.model, batch)

    def for_batch(self, index: int, batch: Batch, own=None):
        """The teacher's side on batch `index`: Moments, logits, or None when no task needs it.
        `own`: the model's output on the batch (where the model is the teacher, its own logits are
        the side; made a row at a time, its own moments, kept from its final state)."""
        if not self.needed:
            return None
        if self.filling is not None and own is not None:
            self.filling.keep(self.teacher, index, own, self.record.get("h"))
        if isinstance(own, FinalState):
            if self.filling is not None and index in self.filling.batches:
                return self.filling.batches[index]
            own = None
        moments = self.memo.side(self.teacher, index, batch) if self.memo is not None else None
        return moments if moments is not None else teacher_logits_for(self.teacher, batch, self.model, own)

    def of(self, side, out=None):
        """`side` for the model variant whose forward ran last, or whose output is `out` (moments
        need its head input: a FinalState is it)."""
        if not isinstance(side, Moments):
            return side
        return side.against(out.h if isinstance(out, FinalState) else self.record["h"])


class MomentsMemo:
    """The teacher's moments on one fixed list of batches, per batch index, made the first time an
    evaluation needs the teacher there. Once the teacher's head turns out not to be linear, `side`
    answers None and every evaluation runs the teacher as before."""

    def __init__(self):
        self.batches: dict[int, Moments] = {}
        self.teacher_id: int | None = None
        self.usable = True

    def side(self, teacher, index: int, batch) -> Moments | None:
        self._for(teacher)
        if self.usable and index not in self.batches:
            with head_inputs(teacher) as record:
                out = forward_output(teacher, batch, head_by_rows(teacher, batch))
            self.keep(teacher, index, out, record.get("h"))
        return self.batches.get(index) if self.usable else None

    def keep(self, teacher, index: int, out, h: torch.Tensor | None) -> None:
        """Keep the moments of the teacher's own forward on batch `index` (its logits, with `h`
        entering its head; or a FinalState, where its head was probed a plain linear map and no
        batch-wide logits were made): the pass that scores the teacher against itself fills the
        memo, and no evaluation after it runs the teacher on these batches again."""
        self._for(teacher)
        if self.usable and index not in self.batches:
            if isinstance(out, FinalState):
                self.batches[index] = teacher_moments(teacher, None, out.h)
            elif self.batches or linear_head(teacher, out, h):   # checked on the first batch
                self.batches[index] = teacher_moments(teacher, out, h)
            else:
                self.usable = False

    def _for(self, teacher) -> None:
        if self.teacher_id != id(teacher):   # another teacher: start again
            self.batches, self.teacher_id, self.usable = {}, id(teacher), True


def group_by_batches(tasks: list[Task]) -> list[tuple[list[Batch], list[Task]]]:
    """Tasks that share one batch list, so each batch runs through a model once for all of them."""
    groups: dict[int, tuple[list[Batch], list[Task]]] = {}
    for task in tasks:
        groups.setdefault(id(task.batches), (task.batches, []))[1].append(task)
    return list(groups.values())


def add_stats(total: dict[str, float], new: dict[str, float]) -> None:
    for key, value in new.items():
        total[key] = total.get(key, 0.0) + value


def my_share(items: list, model=None) -> list[tuple[object, bool]]:
    """This process's share of `items` (all of them in a single process), each with whether it
    counts. With a sharded `model` (--fsdp) every forward pass is a collective, so every
    process runs as many as the process with the most: a shorter share is padded with its own
    first item, run and not counted."""
    from ..processes import process_state

    state = process_state()
    share = [(item, True) for item in items[state.process_index::state.num_processes]]
    if model is not None and state.num_processes > 1:
        from ..shard import is_sharded

        longest = -(-len(items) // state.num_processes)
        if is_sharded(model) and len(share) < longest:
            share += [(items[0], False)] * (longest - len(share))
    return share


def summed_over_processes(totals: dict) -> dict:
    """{variant: {task: sums}} added over every process, in process order, on every process."""
    from accelerate.utils import gather_object

    from ..processes import process_count

    if process_count() == 1:
        return totals
    merged: dict = {}
    for part in gather_object([totals]):
        for key, tasks in part.items():
            for name, sums in tasks.items():
                add_stats(merged.setdefault(key, {}).setdefault(name, {}), sums)
    return merged


def evaluation_bar(share: list, tasks: list[Task]):
    """A bar over an evaluation's batches (held-out text takes minutes on larger models), shown
    where progress is logged (not under --quiet) and on the main process only."""
    from tqdm.auto import tqdm

    from ..processes import is_main_process

    shown = log.isEnabledFor(logging.INFO) and is_main_process() and len(share) > 1
    names = ", ".join(dict.fromkeys(task.name for task in tasks))
    return tqdm(share, desc=f"evaluating {names}", unit="batch", leave=False, disable=not shown)


@torch.no_grad()
def collect_stats(model, tasks: list[Task], teacher=None, outputs: Outputs | None = None,
                  part: slice | None = None) -> dict:
    """Summed task statistics per variant: {variant: {task name: sums}}. Without `outputs`, the
    one variant is the model itself, under key None. `part`: only these of each task's batches
    (they keep their indices, so the teacher's memo still finds them). Tasks that run whole are
    not collected here."""
    device = next(model.parameters()).device
    totals: dict = {}
    for batches, group in group_by_batches([task for task in tasks if task.run is None]):
        with TeacherSide(model, group, teacher) as teaching:
            share = my_share(list(enumerate(batches))[part or slice(None)], model)
            for (index, batch), counts in (share if outputs is not None else evaluation_bar(share, group)):
                batch = batch.to(device)
                rows = teaching.by_rows(batch)
                own = forward_output(model, batch, rows) if outputs is None else None
                side = teaching.for_batch(index, batch, own)
                for key, out in (outputs(batch, rows) if outputs is not None else [(None, own)]):
                    sums = totals.setdefault(key, {}) if counts else {}
                    add_variant_stats(sums, group, model, out, batch, teaching.of(side, out))
                    del out   # not held while the next variant runs
                del own, side
    return summed_over_processes(totals)


def add_variant_stats(sums: dict, tasks: list[Task], model, out, batch: Batch, side) -> None:
    """Add one model variant's statistics on `batch` into `sums` ({task: sums}). A function of its
    own so that nothing of `out` outlives it: a loop variable left bound to the last logits (or to
    a view of them) would hold a whole batch's logits while the next variant or batch makes its own
    (on Gemma-3, 1 GB more at every peak)."""
    for logits, part_batch, part_side in each_row(model, out, batch, side, whole=True):
        for task in tasks:
            add_stats(sums.setdefault(task.name, {}), task.stats(logits, part_batch, part_side))


def summaries(tasks: list[Task], sums: dict) -> dict[str, dict[str, float]]:
    return {task.name: task.summary(sums.get(task.name, {})) for task in tasks if task.run is None}


def evaluate_tasks(model, tasks: list[Task], teacher=None) -> dict[str, dict[str, float]]:
    """Summaries per task for one model; tasks that compare with a teacher need `teacher`."""
    collected = summaries(tasks, collect_stats(model, tasks, teacher).get(None, {}))
    ran = {}
    for task in tasks:
        if task.run is not None:   # generative and lm-eval tasks: the slow ones, each said as it ends
            started = time.perf_counter()
            ran[task.name] = task.run(model, teacher)
            log.info("  %s: %.0fs", task.name, time.perf_counter() - started)
    return {task.name: ran.get(task.name) or collected[task.name] for task in tasks}


def quality_retained(scores: dict[str, dict[str, float]], reference: dict[str, dict[str, float]]) -> float:
    """Quality retained: the mean over tasks of score / reference score (the teacher's). Which
    tasks it averages is part of its meaning: every record that holds one names them."""
    ratios = [scores[name]["score"] / reference[name]["score"] for name in scores if reference[name]["score"] > 0]
    return sum(ratios) / len(ratios) if ratios else float("nan")
