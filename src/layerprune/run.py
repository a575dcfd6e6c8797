"""PruneRun: one pruning run, its lifecycle written out as its methods.

    run = PruneRun(config, inputs, depth, resources, out=out, resume=point)
    run.setup()        # the student (the teacher's layers over its weights, or a checkpoint's) and
                       # its Healer (where the training stream stands, the lr carried); without
                       # `resources` (prepare.py's), the run makes its own, and close() deletes them
    for iteration in run.remaining():
        run.step(iteration)    # score -> cut + patch -> heal -> evaluate -> checkpoint
    history = run.finish(started)   # final healing, final suite, speed

A run with `out` checkpoints there after every iteration and every N healing steps, and
`resume` (checkpoint.resume_point) continues one; without `out` (a comparison's variant) it
writes nothing. Healing is the `Healer`'s (healing/): the run builds one over the `Resources`
it is given (a comparison gives every variant the same) and calls it after each cut. Iterative
mode makes one step per layer; one-shot and block modes one step for all.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import time
from pathlib import Path

import torch

from . import checkpoint
from .checkpoint import History, IterationRecord, PendingIteration, ResumePoint
from .config import PruneConfig
from .depth import Depth
from .errors import NonFiniteError
from .healing import Healer, HealLog, Removal, Resources, build_resources, text_folder
from .importance import ScoringContext, Selection, select_layers
from .inputs import RunInputs, evaluate_student, final_evaluation
from .models import model_name
from .options import to_dict
from .processes import is_main_process, wait_for_everyone
from .patch import PatchFit, candidate_patches, remove_and_patch
from .report import with_interval, write_loss_log
from .speed import compare_speed
from .student import student_of
from .surgery import num_layers, original_indices

log = logging.getLogger(__name__)


class PruneRun:
    """The state a run carries from one iteration to the next, and the steps that change it."""

    def __init__(self, config: PruneConfig, inputs: RunInputs, depth: Depth, resources: Resources | None = None,
                 out: Path | None = None, resume: ResumePoint | None = None, progress: bool = True,
                 student: torch.nn.Module | None = None):
        self.config, self.inputs, self.depth, self.out, self.progress = config, inputs, depth, out, progress
        self.resources, self.point = resources, resume or ResumePoint()
        self.owns_resources = resources is None   # made at setup, closed by close()
        self.records: list[IterationRecord] = list(self.point.records)
        self.student = student   # None: the teacher's copy that shares its weights (student.py), made at setup
        # (--fsdp: a sharded copy, made before)
        self.healer: Healer | None = None

    def setup(self) -> "PruneRun":
        self.student = self.student or student_of(self.inputs.teacher)
        if self.point.folder is not None:
            checkpoint.restore_student(self.student, self.point.folder, self.point.records)
        if self.resources is None:   # a run alone, not prepared by prepare.py: its own
            self.resources = build_resources(self.config, self.inputs.corpus, self.count, self.inputs.teacher,
                                             text_folder(self.out), self.out, self.progress)
        self.healer = Healer(self.config, self.inputs.teacher, self.resources, [r.heal for r in self.records],
                             self.progress)
        return self

    def remaining(self) -> range:
        """The iterations still to run (a resumed run skips the recorded ones)."""
        return range(len(self.records) + 1, self._last + 1)

    @property
    def count(self) -> int:
        """Layers this run removes in all."""
        return self.depth.remove

    @property
    def _last(self) -> int:
        return self.count if self.config.mode == "iterative" else 1

    def step(self, iteration: int) -> IterationRecord:
        """Score, cut (+ patch), heal, evaluate, checkpoint: one record."""
        pending = self._resumed(iteration)   # a resumed iteration refits its patch: same blocks, same T
        if pending is not None:
            log.info("iteration %d: resuming its healing at step %d", iteration, pending.step)
        else:
            started = time.perf_counter()
            pending = PendingIteration(iteration, self._select(iteration), time.perf_counter() - started)
        originals = original_indices(self.student)
        removed, patched = remove_and_patch(self.student, pending.selection.drop, self._patch_fit(),
                                            pending.selection.patches)
        started = time.perf_counter()
        heal_log = self._heal(pending, final=False)
        heal_s = time.perf_counter() - started
        started = time.perf_counter()
        evaluation = evaluate_student(self.inputs, self.student)
        selection = pending.selection
        record = IterationRecord(
            iteration=iteration, removed_current=selection.drop, removed_original=removed,
            scores={str(originals[i]): (None if s != s else s) for i, s in enumerate(selection.scores)},
            layers_after=num_layers(self.student), eval=evaluation, heal=heal_log,
            timings={"score_s": pending.score_s, "heal_s": heal_s, "eval_s": time.perf_counter() - started},
            shortlist=selection.shortlist, block_start=selection.block_start, patch=patched)
        self.records.append(record)
        self._log(record)
        if self.out is not None:   # every process: with --fsdp each writes its shard
            checkpoint.save_checkpoint(self.out, to_dict(self.config), self.records, self.student,
                                       dataclasses.asdict(self.depth))
            wait_for_everyone()
        return record

    def finish(self, started: float) -> History:
        """Final healing, the final suite and speed; `started`: when the run began (perf_counter)."""
        config, inputs = self.config, self.inputs
        final_heal = None
        if config.heal.final_steps:
            pending = self._resumed(self.count + 1) or PendingIteration(self.count + 1, Selection([], []))
            final_heal = self._heal(pending, final=True)
        measured = self.records[-1].eval if final_heal is None and self.records else None
        final_eval, suite, teacher_suite = final_evaluation(inputs, self.student, measured)
        speed = compare_speed(inputs.teacher, self.student, progress=self.progress) if config.measure_speed else {}
        return History(
            config=to_dict(config), model=model_name(config.model), original_layers=num_layers(inputs.teacher),
            final_layers=num_layers(self.student), kept_original=original_indices(self.student),
            removed_original=[layer for record in self.records for layer in record.removed_original],
            teacher_eval=teacher_suite, iterations=self.records, final_heal=final_heal, final_eval=final_eval,
            final_suite=suite, seconds=time.perf_counter() - started, depth=self.depth.why, speed=speed)

    def final_branch(self) -> tuple[torch.nn.Module, HealLog | None, float]:
        """A copy of the student given the final healing a run that stopped here would end with,
        this run left as it was (its student, text position and lr): a comparison reads each count's
        figures off it. (the model, its healing's log, seconds); the student itself where there is
        no final healing."""
        if not self.healer.steps(final=True):
            return self.student, None, 0.0
        started = time.perf_counter()
        student, out, position, lr = self.student, self.out, self.healer.position, self.healer.lr
        self.student, self.out = copy.deepcopy(student), None   # a deep copy owns every weight (student.py)
        try:
            healed = self._heal(PendingIteration(len(self.records) + 1, Selection([], [])), final=True)
            return self.student, healed, time.perf_counter() - started
        finally:
            self.student, self.out = student, out
            self.healer.position, self.healer.lr = position, lr

    def close(self) -> None:
        """Delete the teacher-target cache of resources this run made itself (prepared ones are
        their preparer's to close)."""
        if self.owns_resources and self.resources is not None:
            self.resources.close()

    # ------------------------------------------------------------ the parts of a step

    def _resumed(self, iteration: int) -> PendingIteration | None:
        pending = self.point.pending
        return pending if pending is not None and pending.iteration == iteration else None

    def _patch_fit(self) -> PatchFit:
        config = self.config
        teacher = self.inputs.teacher if config.patch_target == "teacher" else None
        return PatchFit(self.inputs.corpus.patch_blocks, config.patch, config.data.batch_size, self.progress, teacher,
                        config.patch_fit)

    def _select(self, iteration: int) -> Selection:
        """Score the removable layers and choose; with a patch, the removal metrics score patched
        candidates, and the selection carries those patches for the cut to reuse."""
        config, inputs = self.config, self.inputs
        fit = (lambda candidates: candidate_patches(self.student, candidates, self._patch_fit())) \
            if config.patch != "none" else None
        ctx = ScoringContext(inputs.calib_batches, inputs.importance_tasks, inputs.teacher, inputs.teacher_scores,
                             candidates=config.removable(num_layers(self.student)), progress=self.progress,
                             screen=config.screen, fit_patches=fit)
        try:
            return select_layers(self.student, config.metric, config.mode, self.count, ctx, config.shortlist)
        except NonFiniteError as err:
            raise NonFiniteError(f"iteration {iteration}: {err.problem}; the last checkpoint holds the state before "
                                 "it", err.fix) from err

    def _heal(self, pending: PendingIteration, final: bool) -> HealLog | None:
        """The Healer's healing after the removal `pending` describes (already made); its checkpoints
        carry `pending`, and a resumed iteration continues its saved state."""
        if not self.healer.steps(final):
            return None
        config = self.config
        state = self.point.heal_state if self._resumed(pending.iteration) is not None else None
        if state is None and config.eval_before_heal:
            pending = dataclasses.replace(pending, held_out_before=evaluate_student(self.inputs,
                                                                                    self.student).headline())
        save = None if self.out is None else \
            functools.partial(checkpoint.save_heal_checkpoint, self.out, to_dict(config),
                              dataclasses.asdict(self.depth), pending)
        result = self.healer.heal(self.student, Removal(pending.iteration, pending.selection.drop, final, state, save,
                                                        pending.held_out_before))
        if self.out is not None and is_main_process():
            write_loss_log(self.out / "logs" / "heal.csv", result.rows)
        return result

    def _log(self, record: IterationRecord) -> None:
        ppl = record.eval.tasks.get("perplexity", {}).get("perplexity")
        teacher_ppl = self.inputs.teacher_eval.get("perplexity", {}).get("perplexity")
        ppl_text = f" | held-out ppl {ppl:.2f} (teacher {teacher_ppl:.2f})" if ppl is not None else ""
        log.info("iteration %d/%d: removed layer %s (original %s) -> %d layers | quality retained %s%s | %.1fs",
                 record.iteration, self._last, record.removed_current, record.removed_original, record.layers_after,
                 with_interval(record.eval.quality_retained, record.eval.interval), ppl_text,
                 sum(record.timings.values()))
