"""Which training text each healing of a run reads, and the healing guard's validation text.

Healings read the training stream one after the other (or its first blocks again, with
`--train-data reuse`, or the original's own text written from the stream's prompts, with
`--train-data teacher`: teacher_text.py); the guard's validation blocks lie just past the last
of them, so they are training-split text that no step trains on and that is never the held-out text. Everything is
located before any heavy work, so a stream too short for the run fails at once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import teacher_text
from ..config import Recipe
from ..data import Corpus, StreamPosition, TrainStream
from .job import HealLog
from ..processes import is_main_process, wait_for_everyone

log = logging.getLogger(__name__)


def healing_offsets(config: Recipe, count: int) -> list[int]:
    """Where, in blocks from the start of the training stream, the healings of a run of `count`
    removals end: one after the other, or, reusing the text, each from the start."""
    if config.heal.method == "none":
        return []
    per_removal, final = config.heal.blocks_per_removal(config.data.seq_len), config.heal.final_blocks()
    if config.heal.train_data == "reuse":
        return [per_removal, final]
    return [per_removal * i for i in range(1, count + 1)] + [count * per_removal + final]


def validation_blocks(config: Recipe, corpus: Corpus, count: int, progress: bool) -> torch.Tensor | None:
    """Check, before any heavy work, that the training stream holds every healing of a run of
    `count` removals and, when healing is guarded, the validation blocks just past them; return
    those blocks. Past all healed text, they are training-split text no step trains on."""
    offsets = healing_offsets(config, count)
    if not (offsets and config.heal.guard):
        corpus.train.check_holds(offsets, progress)
        return None
    end, size = max(offsets), config.data.blocks("val")
    corpus.train.check_holds([*offsets, end + size], progress, held_back=size)
    return corpus.train.take(size, corpus.train.advance(StreamPosition(), end))[0]


def writes_teacher_text(config: Recipe) -> bool:
    return config.heal.method != "none" and config.heal.train_data in ("teacher", "mix")


def generated_blocks(config: Recipe, count: int) -> int:
    """Blocks of the original's text a run of `count` removals reads (mix: every other one)."""
    end = max(healing_offsets(config, count))
    return (end + 1) // 2 if config.heal.train_data == "mix" else end


def check_teacher_text_disk(config: Recipe, count: int, folder: Path, copies: int = 1) -> None:
    """With --train-data teacher: fail now, before any work, where its text (`copies` of it: one
    per seed of a comparison) would not fit the disk budget."""
    if writes_teacher_text(config):
        teacher_text.check_disk(generated_blocks(config, count) * copies, config.data.seq_len, folder,
                                config.heal.cache_disk)


def healing_text(config: Recipe, corpus: Corpus, count: int, teacher, folder: Path, progress: bool
                 ) -> TrainStream | teacher_text.GeneratedText | teacher_text.MixedText:
    """What the healings of a run of `count` removals read: the training stream, or (--train-data
    teacher) the original's text, written into `folder` by the main process from prompts of the
    stream's first blocks, the guard's validation blocks excepted; or (mix) the two block by block."""
    if not writes_teacher_text(config):
        return corpus.train
    end = max(healing_offsets(config, count))
    written = generated_blocks(config, count)
    if not getattr(corpus.train.tokenizer, "chat_template", None):
        log.warning("--train-data %s: this tokenizer has no chat template, so the original continues the "
                    "training text's first tokens as plain text (no instruction)", config.heal.train_data)
    held = range(end, end + config.data.blocks("val")) if config.heal.guard else range(0)
    if is_main_process():
        text = teacher_text.generate(teacher, corpus.train, written, folder, config.seed, held, progress)
    wait_for_everyone()
    if not is_main_process():   # the main process wrote it all: this reads it
        text = teacher_text.generate(teacher, corpus.train, written, folder, config.seed, held, progress)
    return teacher_text.MixedText(text, corpus.train) if config.heal.train_data == "mix" else text


def carried_lr(recorded: list[HealLog | None]) -> float | None:
    """The lr the next healing starts from: what the guard settled on last (resume)."""
    guarded = [heal.guard for heal in recorded if heal is not None and heal.guard is not None]
    return guarded[-1].next_lr() if guarded else None


def last_position(recorded: list[HealLog | None]) -> StreamPosition:
    """Where the training stream stood after the recorded healings (resume)."""
    ends = [heal.text.end for heal in recorded if heal is not None and heal.text is not None]
    return ends[-1] if ends else StreamPosition()
