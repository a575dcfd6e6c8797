"""The Healer: what the run calls after each removal, and what it is built from.

`Resources` are what several runs on the same inputs can share, made once per run (prune) or
once per comparison (every variant): the teacher-target cache, the Accelerator, the guard's KL
task on its validation blocks (which keeps the original's moments there, so the original runs on
them once), and the text healings read. A `Healer` is one run's: its `HealConfig`, where its
training stream stands, and the learning rate the guard carries from one healing to the next (the
first healing's chosen by a short probe with --heal-lr-probe: lr_probe.py; the final healing's a
quarter of it, as it trains every layer: Healer.lr_for).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import Recipe
from ..data import Corpus, StreamPosition
from ..processes import process_state
from .guard import RETRY_LR_FACTOR, Guard, kl_task
from .job import HealJob, HealLog, TextSpan, plan
from .loop import accelerator_for, heal
from .lr_probe import ProbeLog, probe_lr
from .targets import TargetCache
from .teacher_text import FOLDER as TEACHER_TEXT_FOLDER
from .text import carried_lr, healing_text, last_position, validation_blocks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resources:
    """What every healing of a run, or of a comparison's variants, shares."""

    targets: TargetCache
    accelerator: object | None   # None: nothing heals
    validation: object | None    # the guard's `kl` task on its validation blocks (None: healing unguarded)
    text: object                 # what healings read (text.healing_text): the training stream or the original's text

    def close(self) -> None:
        """Delete the teacher-target cache (a failed run keeps it for its resume)."""
        self.targets.close()


def cache_folder(out: Path | None) -> Path | None:
    """Where this process keeps its teacher targets: under the output folder, so that a resumed
    run reopens them (None: a temporary folder)."""
    return None if out is None else Path(out) / "cache" / f"teacher-{process_state().process_index}"


def text_folder(out: Path | None, seed: int | None = None) -> Path:
    """Where --train-data teacher writes the original's text: in the output folder, so that a
    resumed run reads it again (a comparison: one per seed; no folder: a temporary one)."""
    if out is None:
        return Path(tempfile.mkdtemp(prefix="layerprune-text-"))
    return Path(out) / (TEACHER_TEXT_FOLDER if seed is None else f"{TEACHER_TEXT_FOLDER}-seed{seed}")


def build_resources(config: Recipe, corpus: Corpus, count: int, teacher, text_in: Path, out: Path | None,
                    progress: bool) -> Resources:
    """The resources of healings over runs of up to `count` removals under `config` (a comparison:
    its deepest variant's): the stream is checked to hold them all before any heavy work, the
    guard's blocks lie past them, the original's text (--train-data teacher) is written in
    `text_in`, the target cache under `out`."""
    healing = config.heal.method != "none"
    blocks = validation_blocks(config, corpus, count, progress)
    validation = kl_task(blocks, config.data.batch_size) if blocks is not None else None
    text = healing_text(config, corpus, count, teacher, text_in, progress)
    targets = TargetCache(config.heal, teacher, config.data.seq_len, config.data.batch_size, cache_folder(out),
                          progress)
    accelerator = accelerator_for(config.heal, next(teacher.parameters()).device) if healing else None
    return Resources(targets, accelerator, validation, text)


@dataclass(frozen=True)
class Removal:
    """One healing the run asks for: after removing current layers `dropped` at `iteration` (none:
    the final healing), continuing a checkpointed `resume` state where there is one; `save`
    receives every healing checkpoint; `held_out_before` is what the run measured of the cut."""

    iteration: int
    dropped: list[int]
    final: bool = False
    resume: dict | None = None
    save: Callable[[dict], None] | None = None
    held_out_before: dict = dataclasses.field(default_factory=dict)


class Healer:
    """One run's healings: `heal(student, removal) -> HealLog` after each removal. A resumed run
    passes the healings it recorded, so the stream and the learning rate continue where they were."""

    def __init__(self, config: Recipe, teacher, resources: Resources, recorded: list[HealLog] = (),
                 progress: bool = True):
        self.config, self.teacher, self.resources, self.progress = config, teacher, resources, progress
        self.position: StreamPosition = last_position(recorded)   # where the next healing's fresh text starts
        self.lr: float | None = carried_lr(recorded)   # the guard's last winner (None: --heal-lr)

    def steps(self, final: bool) -> int:
        """Optimizer steps of the healing after a removal (or the final one); 0: none."""
        heal_config = self.config.heal
        if heal_config.method == "none":
            return 0
        return heal_config.final_steps if final else heal_config.steps_per_removal(self.config.data.seq_len)

    def lr_for(self, final: bool) -> float | None:
        """The lr a healing starts at (None: --heal-lr). The final healing trains every layer where a
        removal's trains the cut's neighbours; at the removals' lr it overshot on SmolLM2 at -4 and at
        -6, and healed at a quarter (docs/heal-sweep.md), so by default it starts there."""
        heal_config = self.config.heal
        if not final:
            return self.lr
        if heal_config.final_lr is not None:
            return heal_config.final_lr
        if heal_config.trainable != "neighbours":
            return self.lr
        return (self.lr if self.lr is not None else heal_config.lr) * RETRY_LR_FACTOR

    def heal(self, student: torch.nn.Module, removal: Removal) -> HealLog | None:
        """Heal `student` in place after `removal` (already made): the next stretch of the training
        stream, or its first blocks again with --train-data reuse; the target cache says what is
        cached (targets.plan_caches); the guard watches it on the validation blocks."""
        config, heal_config = self.config, self.config.heal
        steps = self.steps(removal.final)
        if steps == 0:
            return None
        count = heal_config.final_blocks() if removal.final else heal_config.blocks_per_removal(config.data.seq_len)
        reuse = heal_config.train_data == "reuse"
        stream = self.resources.text
        start = StreamPosition() if reuse else self.position
        end = stream.advance(start, count)
        text = stream.span(start, count)
        with self.resources.targets.healing(text, removal.iteration) as (caches, targets):
            job = plan(student, heal_config, steps, removal.iteration, config.seed + removal.iteration,
                       removal.dropped, prefix_cache=caches.prefix, lr=self.lr_for(removal.final),
                       resume=removal.resume,
                       on_checkpoint=removal.save, held_out_before=removal.held_out_before,
                       text=TextSpan(start, end, count, heal_config.epochs, caches.why))
            validation = self.resources.validation
            guard = None if validation is None else \
                Guard(self.teacher, validation, config.data.batch_size, heal_config.guard_retries)
            if heal_config.lr_probe and self.lr is None and guard is not None:
                job = self._probed(student, text, job, targets, guard)
            where = f"the original's own text from block {start.doc}" if heal_config.train_data == "teacher" else \
                f"the original's and the stream's text from block {start.doc}" if heal_config.train_data == "mix" else \
                f"{'the same' if reuse else 'fresh'} text from document {start.doc}"
            log.info("healing iteration %d: %d steps on %d blocks (%s); %s", removal.iteration, steps, count, where,
                     caches.why)
            result = heal(student, self.teacher, text, job, targets, self.progress, guard,
                          self.resources.accelerator)
        if not reuse:
            self.position = end
        if result.guard is not None:
            self.lr = result.guard.next_lr()
            (log.warning if result.guard.outcome == "unhealed" else log.info)(
                "healing iteration %d: %s", removal.iteration, result.guard.sentence())
        return result

    def _probed(self, student, text, job: HealJob, targets, guard: Guard) -> HealJob:
        """`job` starting at the lr the probe chose (lr_probe.py); a resumed healing reads the
        probe's record from its checkpoint instead of probing again."""
        saved = (job.resume or {}).get("lr_probe")
        probe = ProbeLog(**saved) if saved else probe_lr(student, self.teacher, text, job, targets, guard,
                                                         self.resources.accelerator, self.progress)
        return dataclasses.replace(job, lr=probe.chosen, lr_probe=probe.to_json())
