"""PruneRun: one pruning run, its lifecycle written out as its methods.

    run = PruneRun(config, inputs, depth, out=out, resume=point)
    run.setup()        # the student (the teacher's layers over its weights, or a checkpoint's),
                       # where the training stream stands, the healing guard's validation text,
                       # one Accelerator, the teacher-target cache
    for iteration in run.remaining():
        run.step(iteration)    # score -> cut + patch -> heal -> evaluate -> checkpoint
    history = run.finish(started)   # final healing, final suite, speed
    run.close()        # delete the teacher-target cache (a failed run keeps it for its resume)

A run with `out` checkpoints there after every iteration and every N healing steps, and
`resume` (checkpoint.resume_point) continues one; without `out` (a comparison's variant) it
writes nothing. Variants of a comparison share one `Shared`: the target cache, the validation
text and the Accelerator. Iterative mode makes one step per layer; one-shot and block modes one
step for all. Which text each healing reads is heal_text.py's; the run only walks the stream.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint, teacher_text
from .checkpoint import History, IterationRecord, PendingIteration, ResumePoint
from .config import REMOVAL_METRICS, PruneConfig
from .data import StreamPosition
from .depth import Depth
from .errors import NonFiniteError
from .guard import Guard, GuardLog, kl_task
from .heal import accelerator_for, heal
from .heal_job import HealLog, plan
from .heal_text import carried_lr, healing_text, last_position, validation_blocks
from .importance import ScoringContext, Selection, select_layers, shortlisted
from .inputs import RunInputs, evaluate_student, final_evaluation
from .models import model_name
from .options import to_dict
from .processes import is_main_process, process_state, wait_for_everyone
from .patch import PatchFit, candidate_patches, remove_and_patch
from .report import with_interval, write_loss_log
from .speed import compare_speed
from .student import student_of
from .surgery import num_layers, original_indices
from .targets import TargetCache

log = logging.getLogger(__name__)


def cache_folder(out: Path | None) -> Path | None:
    """Where this process keeps its teacher targets: under the output folder, so that a resumed
    run reopens them (None: a temporary folder)."""
    return None if out is None else Path(out) / "cache" / f"teacher-{process_state().process_index}"


def text_folder(out: Path | None) -> Path:
    """Where --train-data teacher writes the original's text: in the output folder, so that a
    resumed run reads it again (no folder: a temporary one)."""
    return Path(out) / teacher_text.FOLDER if out is not None else Path(tempfile.mkdtemp(prefix="layerprune-text-"))


@dataclass
class Shared:
    """What several runs on the same inputs share: a comparison's variants."""

    targets: TargetCache
    validation: torch.Tensor | None = None   # the healing guard's blocks (None: healing unguarded)
    accelerator: object = None
    text: object = None   # what healings read (heal_text.healing_text)


class PruneRun:
    """The state a run carries from one iteration to the next, and the steps that change it."""

    def __init__(self, config: PruneConfig, inputs: RunInputs, depth: Depth, out: Path | None = None,
                 resume: ResumePoint | None = None, shared: Shared | None = None, progress: bool = True,
                 student: torch.nn.Module | None = None):
        self.config, self.inputs, self.depth, self.out, self.progress = config, inputs, depth, out, progress
        self.point, self.shared = resume or ResumePoint(), shared
        self.records: list[IterationRecord] = list(self.point.records)
        self.student = student   # None: the teacher's copy that shares its weights (student.py), made at setup
        # (--fsdp: a sharded copy, made before)
        self.text = None   # what healings read: the training stream, or the teacher's text
        self.position = StreamPosition()   # where the next healing's fresh text starts
        self.lr: float | None = None       # the next healing's starting lr: the guard's last winner (None: --heal-lr)
        self.validation: torch.Tensor | None = None
        self.validation_task = None   # the guard's KL task on them, made once: it keeps the teacher's moments
        self.targets: TargetCache | None = None
        self.accelerator = None
        self.speed: dict = {}

    def setup(self) -> "PruneRun":
        config, inputs, healing = self.config, self.inputs, self.config.heal.method != "none"
        self.student = self.student or student_of(inputs.teacher)
        if self.point.folder is not None:
            checkpoint.restore_student(self.student, self.point.folder, self.point.records)
        self.position, self.lr = last_position(self.records), carried_lr(self.records)
        if self.shared is not None:
            self.targets, self.accelerator = self.shared.targets, self.shared.accelerator
            self.validation = self.shared.validation if healing else None
            self.text = self.shared.text or inputs.corpus.train
            return self
        self.validation = validation_blocks(config, inputs.corpus, self.count, self.progress)
        self.text = healing_text(config, inputs.corpus, self.count, inputs.teacher, text_folder(self.out),
                                 self.progress)
        self.targets = TargetCache(config.heal, inputs.teacher, config.data.seq_len, config.data.batch_size,
                                   cache_folder(self.out), self.progress)
        if healing:
            self.accelerator = accelerator_for(config.heal, next(inputs.teacher.parameters()).device)
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
        pending, fitted = self._resumed(iteration), None   # a resumed iteration refits its patch: same blocks, same T
        if pending is not None:
            log.info("iteration %d: resuming its healing at step %d", iteration, pending.step)
        else:
            started = time.perf_counter()
            selection, fitted = self._select(iteration)
            pending = PendingIteration(iteration, selection, time.perf_counter() - started)
        originals = original_indices(self.student)
        removed, patched = remove_and_patch(self.student, pending.selection.drop, self._patch_fit(), fitted)
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
        if config.measure_speed:
            self.speed = compare_speed(inputs.teacher, self.student, progress=self.progress)
        return History(
            config=to_dict(config), model=model_name(config.model), original_layers=num_layers(inputs.teacher),
            final_layers=num_layers(self.student), kept_original=original_indices(self.student),
            removed_original=[layer for record in self.records for layer in record.removed_original],
            teacher_eval=teacher_suite, iterations=self.records, final_heal=final_heal, final_eval=final_eval,
            final_suite=suite, seconds=time.perf_counter() - started, depth=self.depth.why)

    def close(self) -> None:
        """Delete the teacher-target cache this run opened (a shared one is its owner's to close)."""
        if self.shared is None and self.targets is not None:
            self.targets.close()

    # ------------------------------------------------------------ the parts of a step

    def _resumed(self, iteration: int) -> PendingIteration | None:
        pending = self.point.pending
        return pending if pending is not None and pending.iteration == iteration else None

    def _patch_fit(self) -> PatchFit:
        config = self.config
        teacher = self.inputs.teacher if config.patch_target == "teacher" else None
        return PatchFit(self.inputs.corpus.patch_blocks, config.patch, config.data.batch_size, self.progress, teacher,
                        config.patch_fit)

    def _select(self, iteration: int) -> tuple[Selection, dict | None]:
        """Score the removable layers and choose; with a patch, the removal metrics score patched
        candidates. Returns the selection and those patches (None when candidates were not
        patched), which the cut then reuses."""
        config, inputs = self.config, self.inputs
        ctx = ScoringContext(inputs.calib_batches, inputs.importance_tasks, inputs.teacher, inputs.teacher_scores,
                             candidates=config.removable(num_layers(self.student)), progress=self.progress,
                             screen=config.screen)
        try:
            narrowed = shortlisted(self.student, config.metric, ctx, config.shortlist) \
                if config.mode != "block" else None
            ctx.candidates = narrowed or ctx.candidates
            if config.patch != "none" and config.metric in REMOVAL_METRICS and config.mode != "block":
                ctx.patches = candidate_patches(self.student, ctx.candidates, self._patch_fit())
            selection = select_layers(self.student, config.metric, config.mode, self.count, ctx)
            return dataclasses.replace(selection, shortlist=narrowed), ctx.patches
        except NonFiniteError as err:
            raise NonFiniteError(f"iteration {iteration}: {err.problem}; the last checkpoint holds the state before "
                                 "it", err.fix) from err

    def _heal(self, pending: PendingIteration, final: bool) -> HealLog | None:
        """Heal after the removal `pending` describes (already made); checkpoints carry `pending`.
        The text is the next stretch of the training stream, or its first blocks again with
        --train-data reuse; the target cache says what is cached (targets.plan_caches)."""
        config, heal_config, seq_len = self.config, self.config.heal, self.config.data.seq_len
        steps = heal_config.final_steps if final else heal_config.steps_per_removal(seq_len)
        if heal_config.method == "none" or steps == 0:
            return None
        count = heal_config.final_blocks() if final else heal_config.blocks_per_removal(seq_len)
        reuse = heal_config.train_data == "reuse"
        stream = self.text
        start = StreamPosition() if reuse else self.position
        end = stream.advance(start, count)
        text = stream.span(start, count)
        state = self.point.heal_state if self._resumed(pending.iteration) is not None else None
        with self.targets.healing(text, pending.iteration) as (caches, targets):
            if state is None and config.eval_before_heal:
                pending = dataclasses.replace(pending, held_out_before=evaluate_student(self.inputs,
                                                                                        self.student).headline())
            save = None if self.out is None else \
                functools.partial(checkpoint.save_heal_checkpoint, self.out, to_dict(config),
                                  dataclasses.asdict(self.depth), pending)
            job = plan(self.student, heal_config, steps, pending.iteration, config.seed + pending.iteration,
                       pending.selection.drop, prefix_cache=caches.prefix, lr=self.lr, resume=state,
                       on_checkpoint=save, held_out_before=pending.held_out_before,
                       text={"start": start.to_json(), "end": end.to_json(), "blocks": count,
                             "epochs": heal_config.epochs, "caches": caches.why})
            if self.validation is not None and self.validation_task is None:
                self.validation_task = kl_task(self.validation, config.data.batch_size)
            guard = None if self.validation is None else \
                Guard(self.inputs.teacher, self.validation_task, config.data.batch_size, heal_config.guard_retries)
            where = f"the original's own text from block {start.doc}" if heal_config.train_data == "teacher" else \
                f"{'the same' if reuse else 'fresh'} text from document {start.doc}"
            log.info("healing iteration %d: %d steps on %d blocks (%s); %s", pending.iteration, steps, count, where,
                     caches.why)
            result = heal(self.student, self.inputs.teacher, text, job, targets, self.progress, guard,
                          self.accelerator)
        if not reuse:
            self.position = end
        if result.guard is not None:
            guarded = GuardLog(**result.guard)
            self.lr = guarded.next_lr()
            (log.warning if guarded.outcome == "unhealed" else log.info)("healing iteration %d: %s",
                                                                          pending.iteration, guarded.sentence())
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
